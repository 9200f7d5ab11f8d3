#!/usr/bin/env python
"""FFN-MoE train-step throughput: sparse dispatch vs the dense all-experts reference, side by side in one run.

    python scripts/bench_moe.py [--arch bench] [--experts 4] [--top-k 2] [--batch 4] [--seq 512] [--steps 3]

Both sides are this engine's jitted `full`-phase step (everything trains, as in the BTX paper's MoE fine-tuning)
on the same FFN-MoE (btx_jax/model/moe_ffn.py), differing only in MoESpec.impl: "sparse" is what "auto" picks
on this backend (segment tiles on CPU and GPU, ragged_dot on TPU), "dense" runs every expert on every token and masks
by the routing weights.  Steps alternate between the two (btx_jax/train/throughput.py `interleaved`).

Model FLOPs are counted honestly for the k ACTIVE experts (the dense reference does E/k x the FFN work but is
credited the same model FLOPs): 6 x (attention + k x FFN + router + lm_head weights) per token + causal
attention scores (btx_jax/counting.py `ffn_moe_flops_per_token`).  The sparse side approaches k/E of the dense FFN
work; the padding of the segment tiles (at most E x tile rows) is overhead, not counted.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from btx_jax.command_line import ArgumentParser
from btx_jax.counting import ffn_moe_flops_per_token
from btx_jax.train import throughput


def jax_step(arch: dict, impl: str, args) -> dict:
    """The `full`-phase step of an FFN-MoE with MoESpec.impl = `impl` (same weights and routing for every impl)."""
    import jax

    from btx_jax.config import LlamaConfig, MoESpec
    from btx_jax.model import init_params
    from btx_jax.configs.common import base_config

    config = LlamaConfig(**arch, moe=MoESpec(args.experts, args.top_k))
    params = init_params(config, jax.random.PRNGKey(0))
    config = config.replace(moe=dataclasses.replace(config.moe, impl=impl))
    return throughput.phase_step(base_config(), "full", config, params, global_batch_size=args.batch,
                                 seq_len=args.seq, remat=args.remat)


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench_moe.py", description=__doc__.split("\n\n")[0])
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
    with throughput.cpu_threads(args.threads):       # this process's XLA / torch threads
        return run(args)


def run(args) -> int:
    import jax

    from btx_jax.model.moe_ffn import resolve_impl
    from btx_jax.configs.common import ARCHS
    arch = dict(ARCHS[args.arch])
    tokens = args.batch * args.seq
    sparse = resolve_impl("auto")
    print(f"[bench_moe] {jax.default_backend()}: arch {args.arch} {arch}; top-{args.top_k} of {args.experts} FFN "
          f"experts; batch {args.batch} x seq {args.seq}; sparse impl = {sparse}", flush=True)
    steps, holders, compile_s = {}, {}, {}
    for name, impl in (("sparse", sparse), ("dense", "dense")):
        first = jax_step(arch, impl, args)
        steps[name], compile_s[name], holders[name] = first["step"], first["compile_s"], first["last"]
    times = throughput.interleaved(steps, args.warmup, args.steps)
    for holder in holders.values():
        holder["loss"] = float(holder["metrics"]["loss"])
    flops = ffn_moe_flops_per_token(arch, args.seq, args.experts, args.top_k) * tokens
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
