#!/usr/bin/env python
"""Compose experts on a base Llama into a LoRA-MoE (mergoo semantics) or an FFN-MoE (Branch-Train-MiX's mix step).

    python scripts/compose.py BASE EXPERT [EXPERT ...] --out DST --top-k 2 [--seed-expert]
                              [--router-init normal|zeros] [--router-layers 0,1,...] [--format btx|mergoo]
    python scripts/compose.py SEED EXPERT [EXPERT ...] --mode ffn --out DST --top-k 2 [--seed-expert]
                              [--shared average|seed] [--max-drift 0.5] [--format btx|mixtral]

BASE is an HF Llama directory; each EXPERT a PEFT adapter directory or a btx_jax LoRA checkpoint.  With
--mode ffn each EXPERT may also be a dense model branched from SEED (HF dir or btx checkpoint of an `ffn` /
`full` phase); the result is a Mixtral-architecture model (btx_jax/compose_ffn.py).
Bad input exits with status 2 and one line on stderr; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    p.add_argument("--mode", default="lora", choices=("lora", "ffn"), help="LoRA-MoE per linear | FFN-MoE per layer")
    p.add_argument("--shared", default="average", choices=("average", "seed"),
                   help="--mode ffn: non-FFN weights averaged over the experts or taken from the seed")
    p.add_argument("--max-drift", type=float, default=0.5,
                   help="--mode ffn: largest relative L2 distance of an expert from the seed (branched check)")
    p.add_argument("--format", default="btx", choices=("btx", "mergoo", "mixtral"))
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
        if Path(args.out).exists() and not args.overwrite:      # before the (slow) composition
            raise btx_jax.CheckpointError(f"{args.out}: destination already exists (pass --overwrite)")
        moe = btx_jax.compose(args.base, args.experts, mode=args.mode, top_k=args.top_k, seed_expert=args.seed_expert,
                              router_init=args.router_init, router_std=args.router_std,
                              router_layers=args.router_layers, seed=args.seed, allow_pickle=args.allow_pickle,
                              allow_other_base=args.allow_other_base, shared=args.shared,
                              max_drift=args.max_drift)
        out = moe.save_pretrained(args.out, format=args.format, overwrite=args.overwrite)
    except (btx_jax.ConfigError, btx_jax.CheckpointError, DiskError) as e:
        print(f"compose.py: error: {e}", file=sys.stderr)
        return 2
    if args.mode == "ffn":
        m = moe.config.moe
        print(f"wrote {args.format} FFN-MoE to {out}: {m.num_experts} FFN experts"
              f"{' (the last is the seed)' if m.seed_expert else ''}, top-{m.top_k}")
        return 0
    spec = moe.config.adapter
    print(f"wrote {args.format} LoRA-MoE to {out}: {len(spec.experts)} experts{' + seed' if spec.seed_expert else ''}, "
          f"top-{spec.top_k}, targets {','.join(spec.targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
