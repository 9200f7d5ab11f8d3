"""The compose command line (scripts/compose.py): experts on a base Llama -> a LoRA-MoE (mergoo semantics), or with
--mode ffn dense experts on a seed -> an FFN-MoE (Mixtral), saved in the chosen format (btx_jax/compose.py).

    main(["BASE", "EXPERT", "EXPERT", "--out", "DST", "--top-k", "2", "--format", "mergoo"])   # -> 0

Bad input (arguments, experts that do not fit the base, an existing --out without --overwrite, disk faults)
returns 2 after one line on stderr (`compose.py: error: ...`); nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import CheckpointError, check_destination
from btx_jax.cli import ArgumentParser, stopping_cleanly
from btx_jax.compose import MODES, compose
from btx_jax.config import ConfigError
from btx_jax.disk import DiskError
from btx_jax.pretrained import Pretrained


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--router-layers {text!r} is not a comma-separated list of integers")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="compose.py", description="Compose experts on a base Llama into a LoRA-MoE (mergoo "
                       "semantics) or an FFN-MoE (Branch-Train-MiX's mix step).")
    p.add_argument("base", help="HF Llama directory")
    p.add_argument("experts", nargs="+", help="PEFT adapter directories or btx_jax LoRA checkpoints")
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed-expert", action="store_true", help="add a LoRA-free expert the router may pick")
    p.add_argument("--router-init", default="normal", choices=("normal", "zeros"))
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--router-layers", type=_layers, default=None, help="comma-separated layer indices")
    p.add_argument("--mode", default="lora", choices=MODES, help="LoRA-MoE per linear | FFN-MoE per layer")
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
    return p


def _summary(moe: Pretrained, mode: str, fmt: str, out) -> str:
    if mode == "ffn":
        m = moe.config.moe
        return (f"wrote {fmt} FFN-MoE to {out}: {m.num_experts} FFN experts"
                f"{' (the last is the seed)' if m.seed_expert else ''}, top-{m.top_k}")
    spec = moe.config.adapter
    return (f"wrote {fmt} LoRA-MoE to {out}: {len(spec.experts)} experts{' + seed' if spec.seed_expert else ''}, "
            f"top-{spec.top_k}, targets {','.join(spec.targets)}")


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/compose.py: exit 0, or 2 with one line on stderr (`compose.py: error: ...`); nothing is written
    then."""
    args = build_parser().parse_args(argv)
    try:
        with stopping_cleanly(args.out):      # SIGTERM / Ctrl-C: one line, nothing left at --out
            sources = {link for d in (args.base, *args.experts) for link in btx.links(d)}
            check_destination(args.out, overwrite=args.overwrite, sources=sources)    # before the (slow) composition
            moe = compose(args.base, args.experts, mode=args.mode, top_k=args.top_k, seed_expert=args.seed_expert,
                          router_init=args.router_init, router_std=args.router_std, router_layers=args.router_layers,
                          seed=args.seed, allow_pickle=args.allow_pickle, allow_other_base=args.allow_other_base,
                          shared=args.shared, max_drift=args.max_drift)
            out = moe.save_pretrained(args.out, format=args.format, overwrite=args.overwrite)
    except SystemExit as e:          # stopped by a signal: one line printed
        return int(e.code)
    except (ConfigError, CheckpointError, DiskError) as e:
        print(f"compose.py: error: {e}", file=sys.stderr)
        return 2
    print(_summary(moe, args.mode, args.format, out))
    return 0
