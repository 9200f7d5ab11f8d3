"""Rehearse the seed's recipe at a chosen shape: every phase, as a user runs it, measured (btx_jax/rehearse.py).

    btx rehearse --shape=tiny --steps=2 --out=/tmp/reh
    btx rehearse --shape=1.1b --vocab=4096 --out=/tmp/reh11    # TinyLlama-1.1B shapes, bundled tokenizer
    btx rehearse --shape=271m --hidden=1024 --layers=8 --out=/tmp/reh_medium

A random bf16 HF Llama of the shape (presets below; --hidden etc. override one field), the seed-scale presets
expert:{wiki,math,novel}, router and sft (btx_jax/configs/) as they are (LoRA r=640 alpha 32 dropout 0.1 on
gate/up/down_proj, bf16, remat full) changed only in model.init, the tokenizer, the data paths (local copies of
the seed's datasets laid out as the hub has them) and the sizes (--seq-len, --batch, --steps, a checkpoint every
step), on --devices virtual CPU devices.  Writes OUT/rehearsal.md, OUT/rehearsal.json and OUT/logs/.  Exit 1 if
any step failed (it is in the table with its exit code), 2 on bad input.

The tokenizer is the bundled 4,096-piece sentencepiece model unless --tokenizer names another (e.g. the Llama-2
tokenizer directory): its ids fit any vocab >= 4,096, and the embedding and lm_head keep the shape's full
vocabulary, so memory is that of the shape.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from btx_jax.command_line import ArgumentParser, positive_int, run_cli
from btx_jax.configs.common import ARCHS, BUNDLED_TOKENIZER
from btx_jax.configs.expert import DOMAINS

SHAPES = {"tiny": ARCHS["tiny"],
          "271m": dict(ARCHS["bench"], hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16,
                       num_kv_heads=16),        # scripts/bench_memory.py's 271M
          "1.1b": ARCHS["tinyllama_1b"]}
FIELDS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads",
          "vocab": "vocab_size", "intermediate": "intermediate_size", "head_dim": "head_dim"}


def phases() -> dict:
    """{phase: (config file:preset, the preset's source names in order)} of the seed-scale presets."""
    from btx_jax.configs import expert, router, sft
    presets = {**{f"expert:{d}": ("expert", d) for d in DOMAINS}, "router": ("router", ""), "sft": ("sft", "")}
    modules = {"expert": expert, "router": router, "sft": sft}
    return {name: (f"{file}:{words}",        # "router:" is the seed-scale preset ("router" the tiny one)
                   [s["name"] for s in modules[file].get_config(words).data.sources])
            for name, (file, words) in presets.items()}


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="btx rehearse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    for flag in FIELDS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=positive_int, default=None,
                       help=f"override the shape's {FIELDS[flag]}")
    p.add_argument("--steps", type=positive_int, default=3, help="train.steps of every phase (SFT resumes to +1)")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch", type=positive_int, default=8, help="global batch size")
    p.add_argument("--devices", type=positive_int, default=8, help="virtual CPU devices")
    p.add_argument("--rows", type=positive_int, default=200, help="records in each local dataset copy")
    p.add_argument("--tokenizer", default=BUNDLED_TOKENIZER,
                   help="sentencepiece file or tokenizer directory copied into the model directory")
    p.add_argument("--compile-cache", action="store_true",
                   help="share XLA compilations between the phases' processes (faster; lower compile peaks)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--out", required=True, help="output directory (model, data, runs, exports, table)")
    args = p.parse_args(argv)
    arch = dict(SHAPES[args.shape])
    arch.update({FIELDS[k]: v for k, v in vars(args).items() if k in FIELDS and v is not None})

    def run():
        from btx_jax.rehearse import rehearse
        steps = rehearse(args.out, arch, phases(), steps=args.steps, seq_len=args.seq_len, batch=args.batch,
                         devices=args.devices, tokenizer=args.tokenizer, rows=args.rows,
                         compile_cache=args.compile_cache, overwrite=args.overwrite)
        print(open(os.path.join(args.out, "rehearsal.md"), encoding="utf-8").read())
        failed = [s.name for s in steps if not s.ok]
        if failed:
            print(f"rehearse: {len(failed)} step(s) failed: {', '.join(failed)} (logs in {args.out}/logs)",
                  file=sys.stderr)
        return 1 if failed else 0

    return run_cli(run)
