"""Memory and scale plan: AOT-compile the real train step on abstract inputs and report, per device,
parameter / optimizer / gradient / temporary bytes, FLOPs per step, and the largest global batch that fits.

    btx plan --config expert:wiki --devices 8 --phase expert,router,sft \
        --experts 3 --top-k 2 --batch 32 --device-memory 80GB --search

    btx plan --config sft:wiki --phase sft --target tpu:v5e-16 --search

    btx plan --config expert:wiki --phase expert,router,sft --target gpu:h100-8 \
        --batch 128 --search

`--target` picks the compiler: `cpu:N` (N virtual CPU devices, the default with --devices), a TPU slice
(`tpu:v5p-8`, `tpu:v5e-16`, `tpu:v4-8`, `tpu:v6e-8`, or a libtpu topology name such as `tpu:v5p:2x2x1`),
compiled by the real TPU compiler with no TPU present (needs `pip install -e ".[tpu]"`), or GPU nodes
(`gpu:h100-8`, `gpu:h200-8`, `gpu:a100-8`, `gpu:h100-2x8` = 2 nodes x 8, `gpu:<target config .txtpb>[@2x8]`),
compiled by XLA's GPU compiler with no GPU present (needs `pip install -e ".[cuda]"`); see btx_jax/train/aot.py.
TPU plans also report XLA's cost-model step time and the MFU it implies against the chip's published bf16 peak,
and default --device-memory to the chip's HBM.  GPU plans default it to the target config's device memory and
judge `fits` against it themselves (the GPU compiler accepts any size); XLA has no GPU cost model on this
compile-only path, so a GPU plan has no step time and its FLOPs are the model count (btx_jax/counting.py:
forward + backward, remat recomputation not counted).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from btx_jax import mesh as mesh_lib, schema
from btx_jax.command_line import ArgumentParser, run_cli, size_flag
from btx_jax.config import ATTENTION_IMPLS, DTYPES, LOSS_LAYOUTS, REMAT_CHOICES, ConfigError
from btx_jax.train import aot
from btx_jax.train.plan import load_config, max_batch, plan, table
from btx_jax.train.trainer import resolved


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="btx plan", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  btx plan --config=expert:wiki --devices=8 --phase=expert,router,sft "
                              "--search")
    p.add_argument("--config", default="expert:wiki", help="config NAME[:PRESET] or FILE.py[:PRESET]")
    p.add_argument("--phase", default=None, help="comma-separated phases (default: the config's)")
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices to compile for (= --target cpu:N)")
    p.add_argument("--target", default=None, help="cpu:N | tpu:v5p-8 | tpu:v5e-16 | tpu:v4-8 | tpu:v6e-8 | "
                   "tpu:<libtpu topology> | gpu:h100-8 | gpu:h200-8 | gpu:a100-8 | gpu:h100-2x8 (nodes x GPUs) | "
                   "gpu:<GpuTargetConfig .txtpb>[@<nodes>x<GPUs>] (default cpu:--devices)")
    p.add_argument("--loss-chunk", type=int, default=None, help="cross-entropy chunk (positions); 0 = full logits")
    p.add_argument("--loss-layout", default=None, choices=LOSS_LAYOUTS,
                   help="train.loss_layout: sharding of the chunked loss (batch | vocab | auto)")
    p.add_argument("--attention", default=None, choices=ATTENTION_IMPLS, help="train.attention")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--remat", default=None, choices=REMAT_CHOICES)
    p.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype, e.g. bfloat16")
    p.add_argument("--frozen-dtype", default=None, choices=DTYPES)
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--experts", type=int, default=3, help="LoRA experts of the router/sft LoRA-MoE")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--device-memory", type=size_flag, default=None,
                   help="e.g. 80GB (TPU: the chip's HBM; GPU: the target config's device memory)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free in --search")
    p.add_argument("--search", action="store_true", help="also find the largest batch that fits")
    p.add_argument("--out", default=None, help="write the plan as JSON")
    return p


def apply_flags(cfg: dict, args) -> None:
    """The train / mesh overrides of the command line, in place on the resolved config."""
    t = cfg["train"]
    for key, val in (("global_batch_size", args.batch), ("seq_len", args.seq_len), ("remat", args.remat),
                     ("dtype", args.dtype), ("frozen_dtype", args.frozen_dtype),
                     ("microbatches", args.microbatches), ("loss_chunk", args.loss_chunk),
                     ("loss_layout", args.loss_layout),
                     ("attention", args.attention)):
        if val is not None:
            t[key] = val
    if args.mesh:
        cfg["mesh"].update(mesh_axes(args.mesh))


def mesh_axes(text: str) -> dict[str, int]:
    """{axis: size} of a --mesh value such as "data=1,fsdp=8,tensor=1"; ConfigError (one line) otherwise."""
    pairs = [kv.partition("=") for kv in text.split(",")]
    if not all(k.strip() and sep and re.fullmatch(r"\s*-?\d+\s*", v) for k, sep, v in pairs):
        raise ConfigError(f"--mesh {text!r}: expected axis=size pairs separated by commas, e.g. data=1,fsdp=8,tensor=1")
    return {k.strip(): int(v) for k, _, v in pairs}


def progress(message: str) -> None:
    """Compile progress, on stderr (the table and JSON go to stdout / --out)."""
    print(message, file=sys.stderr, flush=True)


def run(args, target: aot.Target) -> int:
    """Plan every phase of `args.phase` (the config's by default) for `target`, print the table, write --out
    (within aot.compile_only(target))."""
    memory = args.device_memory or target.hbm_bytes
    cfg = resolved(load_config(args.config))
    apply_flags(cfg, args)
    t = schema.parse(cfg).train
    devices = aot.target_devices(target)
    mesh = mesh_lib.make_mesh(cfg["mesh"], devices)
    print(f"[plan] {args.config}: {target.text} = {len(devices)} {devices[0].device_kind} devices, "
          f"mesh {dict(mesh.shape)}, seq {t.seq_len}, dtype {t.dtype}, frozen {t.frozen_dtype}, remat {t.remat}",
          flush=True)
    rows = []
    tic = time.perf_counter()
    for phase in (args.phase or cfg["phase"]).split(","):
        r = plan(cfg, phase=phase, experts=args.experts, top_k=args.top_k, mesh=mesh, target=target, log=progress)
        if args.search and memory:    # one loss layout for every batch tried, so the peak stays affine in it
            fixed = {**cfg, "train": {**cfg["train"], "loss_layout": r["loss_layout"]}} if "loss_layout" in r else cfg
            best, runs = max_batch(fixed, memory, phase=phase, experts=args.experts,
                                   top_k=args.top_k, mesh=mesh, headroom=args.headroom, target=target,
                                   known=(r,), log=progress)
            r["max_batch"] = best
            r["search"] = [{"batch": x["global_batch"], "peak": x["bytes"]["peak"]} for x in runs]
        rows.append(r)
        print(table([r], memory).splitlines()[-1], flush=True)
    total = time.perf_counter() - tic
    print()
    if memory:
        print(f"device memory {memory / 1e9:.0f} GB = {memory / 2**30:.2f} GiB per device"
              + (f"; max batch keeps {args.headroom:.0%} headroom" if args.search else ""))
    print(table(rows, memory))
    if target.platform == "gpu":
        print("\nXLA has no GPU cost model (compile-only): no step time; TFLOP/dev/step is the model count "
              "(btx_jax/counting.py, remat recomputation not counted)")
    print(f"\n[plan] total {total:.1f}s (compile only; nothing allocated)")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "device_memory": memory,
                                              "rows": rows, "seconds": round(total, 1)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`btx plan`: exit 0, or 2 with one line on stderr for bad input."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _compile_only_run(args))


def _compile_only_run(args) -> int:
    target = aot.parse_target(args.target or f"cpu:{args.devices}")
    with aot.compile_only(target):      # the process's platform and XLA flags, for this command only
        return run(args, target)
