#!/usr/bin/env python
"""Compose LoRA experts on a base Llama into a LoRA-MoE (Branch-Train-MiX's mix step, mergoo semantics).

    python scripts/compose.py BASE EXPERT [EXPERT ...] --out DST --top-k 2 [--seed-expert]
                              [--router-init normal|zeros] [--router-layers 0,1,...] [--format btx|mergoo]

BASE is an HF Llama directory; each EXPERT a PEFT adapter directory or a btx_jax LoRA checkpoint.
Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):                       # one stderr line, exit 2 (argparse prints usage too)
        print(f"compose.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--router-layers {text!r} is not a comma-separated list of integers")


def parse_args(argv):
    p = _Parser(prog="compose.py", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="HF Llama directory")
    p.add_argument("experts", nargs="+", help="PEFT adapter directories or btx_jax LoRA checkpoints")
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed-expert", action="store_true", help="add a LoRA-free expert the router may pick")
    p.add_argument("--router-init", default="normal", choices=("normal", "zeros"))
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--router-layers", type=_layers, default=None, help="comma-separated layer indices")
    p.add_argument("--format", default="btx", choices=("btx", "mergoo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--allow-other-base", action="store_true",
                   help="compose btx experts even if they were trained on another base (their recorded digest)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import btx_jax
    from btx_jax.disk import DiskError
    try:
        moe = btx_jax.compose(args.base, args.experts, top_k=args.top_k, seed_expert=args.seed_expert,
                              router_init=args.router_init, router_std=args.router_std,
                              router_layers=args.router_layers, seed=args.seed, allow_pickle=args.allow_pickle,
                              allow_other_base=args.allow_other_base)
        out = moe.save_pretrained(args.out, format=args.format, overwrite=args.overwrite)
    except (btx_jax.ConfigError, btx_jax.CheckpointError, DiskError) as e:
        print(f"compose.py: error: {e}", file=sys.stderr)
        return 2
    spec = moe.config.adapter
    print(f"wrote {args.format} LoRA-MoE to {out}: {len(spec.experts)} experts{' + seed' if spec.seed_expert else ''}, "
          f"top-{spec.top_k}, targets {','.join(spec.targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
