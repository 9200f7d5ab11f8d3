#!/usr/bin/env python
"""FFN-MoE train-step throughput: sparse dispatch vs the dense all-experts reference, side by side in one run.

    python scripts/bench_moe.py [--arch bench] [--experts 4] [--top-k 2] [--batch 4] [--seq 512] [--steps 3]

Both sides are this engine's jitted `full`-phase step (everything trains, as in the BTX paper's MoE fine-tuning)
on the same FFN-MoE (btx_jax/model/moe_ffn.py), differing only in MoESpec.impl: "sparse" is what "auto" picks
on this backend (segment tiles on CPU, ragged_dot on GPU/TPU), "dense" runs every expert on every token and masks
by the routing weights.  Steps alternate between the two (scripts/bench.py `interleaved`).

Model FLOPs are counted honestly for the k ACTIVE experts (the dense reference does E/k x the FFN work but is
credited the same model FLOPs): 6 x (attention + k x FFN + router + lm_head weights) per token + causal
attention scores.  The sparse side approaches k/E of the dense FFN work; the padding of the segment tiles
(at most E x tile rows) is overhead, not counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import _first_step, _setup_threads, interleaved, random_batch  # noqa: E402


def model_flops_per_token(arch: dict, seq: int, experts: int, top_k: int) -> float:
    h, m, V, L = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"], arch["num_layers"]
    q, kv = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"]
    attn_w = 2 * h * q + 2 * h * kv
    active = L * (attn_w + top_k * 3 * h * m + h * experts) + h * V
    return 6 * active + 3 * 2 * seq * q * L


def jax_step(arch: dict, impl: str, args):
    import jax

    from btx_jax.config import LlamaConfig, MoESpec
    from btx_jax.model import init_params
    from btx_jax.pretrained import Pretrained, memory_source
    from btx_jax.train.trainer import initial_state, resolved, wire
    from configs.common import base_config

    c = base_config()
    c.phase = "full"
    c.mesh.update(dict(data=1, fsdp=1, tensor=1, num_devices=1))
    c.train.update(global_batch_size=args.batch, seq_len=args.seq, remat=args.remat)
    cfg = resolved(c)
    config = LlamaConfig(**arch, moe=MoESpec(args.experts, args.top_k))
    params = init_params(config, jax.random.PRNGKey(0))     # same weights (and routing) for both impls
    config = config.replace(moe=dataclasses.replace(config.moe, impl=impl))
    phase = wire(cfg, source=memory_source(Pretrained(config, params)))
    built = phase.built
    state, _ = initial_state(phase, 0)
    batch = random_batch(arch["vocab_size"], args.batch, args.seq, built.batch_sharding)
    holder = {"state": state, "loss": None}

    def step():
        holder["state"], metrics = built.step_fn(holder["state"], batch)
        holder["loss"] = float(jax.block_until_ready(metrics["loss"]))

    return _first_step(step), holder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_moe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="bench", help="configs/common.py ARCHS name")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--remat", default="none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    _setup_threads(args.threads)
    import jax

    from btx_jax.model.moe_ffn import resolve_impl
    from configs.common import ARCHS
    arch = dict(ARCHS[args.arch])
    tokens = args.batch * args.seq
    sparse = resolve_impl("auto")
    print(f"[bench_moe] {jax.default_backend()}: arch {args.arch} {arch}; top-{args.top_k} of {args.experts} FFN "
          f"experts; batch {args.batch} x seq {args.seq}; sparse impl = {sparse}", flush=True)
    steps, holders, compile_s = {}, {}, {}
    for name, impl in (("sparse", sparse), ("dense", "dense")):
        first, holders[name] = jax_step(arch, impl, args)
        steps[name], compile_s[name] = first["step"], first["compile_s"]
    times = interleaved(steps, args.warmup, args.steps)
    flops = model_flops_per_token(arch, args.seq, args.experts, args.top_k) * tokens
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"impl": sparse if name == "sparse" else "dense", "ms_per_step": med * 1e3,
                      "tokens_per_s": tokens / med, "model_gflop_per_step": flops / 1e9,
                      "gflop_per_s": flops / med / 1e9, "compile_s": compile_s[name], "times_s": t,
                      "last_loss": holders[name]["loss"]}
        print(f"[bench_moe] {name:6s} ({rows[name]['impl']:7s}) median {med * 1e3:8.1f} ms/step "
              f"{tokens / med:8.0f} tok/s  {flops / med / 1e9:6.1f} model GFLOP/s  (compile {compile_s[name]:.0f} s)")
    speedup = rows["dense"]["ms_per_step"] / rows["sparse"]["ms_per_step"]
    print(f"[bench_moe] sparse / dense tokens/s: {speedup:.2f}x; same losses: "
          f"{holders['sparse']['loss']:.5f} vs {holders['dense']['loss']:.5f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "arch": arch, "rows": rows, "speedup": speedup},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
