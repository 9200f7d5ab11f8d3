#!/usr/bin/env python
"""One prepared GPU check: the attention kernel `--attention` resolves to on this device (auto on CUDA: the
Pallas Triton flash kernel, btx_jax/model/triton_attention.py) checked against the masked reference on packed
rows (loss and gradients, bf16) and timed, then MFU of the expert and router train steps of a ~1.1B Llama in bf16
against the bf16 matmul peak measured in the same run (goal on an H200: >= 45%).  Exits 1 if the kernel
disagrees with the reference.

    python scripts/gpu_check.py                 # GPU: TinyLlama-1.1B shapes, batch 8 x 2048, bf16
    python scripts/gpu_check.py --tiny          # CPU smoke run: the tiny arch, fp32, 2 steps

Uses the engine's own step and the same model-FLOPs count and matmul-peak probe as scripts/bench.py
(btx_jax/train/throughput.py; btx_jax/counting.py `lora_flops_per_token`: forward 2N, input gradients 2N,
weight gradients 2N on trainable weights only, causal attention; remat recomputation not counted).  Prints one
table; --out writes JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from btx_jax.command_line import ArgumentParser
from btx_jax.config import MLP_TARGETS
from btx_jax.counting import lora_flops_per_token
from btx_jax.model.attention import IMPLS, causal_attention, resolve
from btx_jax.train import throughput


def check_attention(impl: str, B: int, T: int, N: int, K: int, H: int, dtype: str) -> dict:
    """Largest |kernel - reference| of the loss and of dq, dk, dv (each relative to the reference's largest
    magnitude) for causal attention over rows packed with 8 documents of random lengths (one for cuDNN), plus
    each side's forward + backward milliseconds."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), dtype) for n in (N, K, K))
    docs = 1 if impl == "cudnn" else 8          # cuDNN takes no segment ids: rows of one document for it
    seg = jnp.asarray(np.sort(r.integers(1, docs + 1, (B, T)), axis=1), jnp.int32)
    fns = {name: jax.jit(jax.value_and_grad(lambda q, k, v, name=name: jnp.sum(
        causal_attention(q, k, v, seg, name).astype(jnp.float32) ** 2), (0, 1, 2))) for name in (impl, "xla")}
    out = {name: jax.block_until_ready(fn(q, k, v)) for name, fn in fns.items()}
    ms = {}
    for name, fn in fns.items():
        tic = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(fn(q, k, v))
        ms[name] = (time.perf_counter() - tic) / 3 * 1e3
    got, ref = jax.tree_util.tree_leaves(out[impl]), jax.tree_util.tree_leaves(out["xla"])
    err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - x.astype(jnp.float32)))
                    / max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))), 1e-6)) for g, x in zip(got, ref))
    return {"impl": impl, "shape": [B, T, N, K, H], "max_rel_err": err, "ms": ms[impl], "reference_ms": ms["xla"]}


def main(argv=None) -> int:
    p = ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny arch, fp32)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="auto", choices=IMPLS,
                   help="btx_jax/model/attention.py implementation (auto: by backend, triton on CUDA; cudnn: the "
                        "check's rows hold one document each, so cuDNN flash attention is exact here)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--goal", type=float, default=0.45)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax
    from btx_jax.configs.common import ARCHS, base_config
    if args.tiny:
        arch, dtype, n_peak = dict(ARCHS["tiny"]), "float32", 1024
        batch, seq, steps = args.batch or 2, args.seq or 64, 2
    else:
        arch, dtype, n_peak = dict(ARCHS["tinyllama_1b"]), "bfloat16", 8192
        batch, seq, steps = args.batch or 8, args.seq or 2048, args.steps
    rank, experts, top_k = 64, 3, 2
    impl = resolve(args.attention, jax.default_backend())
    attn = check_attention(impl, 2, seq, arch["num_heads"], arch["num_kv_heads"], arch["head_dim"], dtype)
    tol = 3e-2 if dtype == "bfloat16" else 1e-4
    print(f"[gpu_check] attention {args.attention} -> {impl}: packed rows {attn['shape']} (B, T, N, K, H), "
          f"max relative error {attn['max_rel_err']:.2e} (tolerance {tol:g}) against the masked reference; "
          f"forward + backward {attn['ms']:.2f} ms (reference {attn['reference_ms']:.2f} ms)", flush=True)
    if attn["max_rel_err"] > tol:
        print(f"[gpu_check] attention {impl} disagrees with the reference", file=sys.stderr)
        return 1
    peak = throughput.matmul_peak(n_peak, dtype, reps=10, warmup=1)["xla"]
    dev = jax.devices()[0]
    print(f"[gpu_check] {dev.platform} {getattr(dev, 'device_kind', '')}: measured {dtype} matmul peak "
          f"({n_peak}^3) {peak / 1e12:.1f} TFLOP/s; batch {batch} x seq {seq}, remat {args.remat}, "
          f"attention {impl}", flush=True)
    rows = []
    for phase in ("expert", "router"):
        fpt = lora_flops_per_token(arch, seq, MLP_TARGETS, rank, experts, top_k, phase != "expert", phase)
        r = throughput.lora_step(base_config(), phase, arch, rank=rank, experts=experts, top_k=top_k,
                                 global_batch_size=batch, seq_len=seq, dtype=dtype, frozen_dtype=dtype,
                                 remat=args.remat, attention=args.attention)
        med = statistics.median(throughput.interleaved({phase: r["step"]}, 1, steps)[phase])
        tps = batch * seq / med
        rows.append({"phase": phase, "step_ms": med * 1e3, "tokens_per_s": tps, "tflops": fpt * tps / 1e12,
                     "mfu": fpt * tps / peak, "first_step_s": r["compile_s"]})
    print("| phase | ms/step | tokens/s | model TFLOP/s | MFU | goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = "ok" if r["mfu"] >= args.goal else "below"
        print(f"| {r['phase']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | "
              f"{r['mfu']:.1%} | {ok} (>= {args.goal:.0%}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(dev), "peak_flops": peak, "rows": rows, "attention": attn,
                                              "arch": arch, "batch": batch, "seq": seq, "dtype": dtype}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
