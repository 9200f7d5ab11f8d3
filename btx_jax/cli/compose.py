"""The compose command line (`btx compose`): experts on a base Llama -> a LoRA-MoE (mergoo semantics), or with
--mode ffn dense experts on a seed -> an FFN-MoE (Mixtral), saved in the chosen format (btx_jax/mix/compose.py).

    main(["BASE", "EXPERT", "EXPERT", "--out", "DST", "--top-k", "2", "--format", "mergoo"])   # -> 0

The flags make the mode's spec (btx_jax/mix/compose.py make_spec: a flag of the other mode, e.g. --shared without
--mode ffn, is refused).  Bad usage is one line `error: btx compose: ...` (btx_jax/command_line.py ArgumentParser), bad
input (bad values, experts that do not fit the base, an existing --out without --overwrite, disk faults) one
line `error: ...` (btx_jax/command_line.py run_cli); both return 2 and nothing is written then.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import check_destination
from btx_jax.command_line import ArgumentParser, run_cli, stopping_cleanly
from btx_jax.config import DTYPES
from btx_jax.mix.compose import MODES, compose, make_spec
from btx_jax.mix.compose_ffn import SHARED
from btx_jax.pretrained import Pretrained
from btx_jax.mix.router_init import ROUTER_INITS

SPEC_FLAGS = ("top_k", "seed_expert", "router_init", "router_std", "router_jitter", "router_seed", "router_layers",
              "allow_other_base", "shared", "max_drift")    # the flags (dest names) that make the spec; None: not given


EXAMPLES = """examples:
  btx compose llama2 runs/wiki/final runs/math/final runs/novel/final --out moe --top-k 2 --format mergoo
  btx compose llama2 runs/wiki/final runs/math/final --mode ffn --format mixtral --dtype bfloat16 --out btx_moe
"""


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--router-layers {text!r} is not a comma-separated list of integers")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="btx compose", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compose experts on a base Llama into a LoRA-MoE (mergoo semantics) or an FFN-MoE "
                       "(Branch-Train-MiX's mix step).", epilog=EXAMPLES)
    p.add_argument("base", help="HF Llama directory")
    p.add_argument("experts", nargs="+", help="PEFT adapter directories or btx_jax LoRA checkpoints")
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--mode", default="lora", choices=MODES, help="LoRA-MoE per linear | FFN-MoE per layer")
    p.add_argument("--top-k", type=int, default=None, help="experts mixed per token (default 2)")
    p.add_argument("--seed-expert", action="store_true", default=None,
                   help="add a choice that keeps the base alone (the seed's own FFN with --mode ffn)")
    p.add_argument("--router-init", default=None, choices=ROUTER_INITS, help="default: normal")
    p.add_argument("--router-std", type=float, default=None, help="std of --router-init normal (default 0.02)")
    p.add_argument("--router-jitter", type=float, default=None,
                   help="multiplicative router-input noise while training (default 0)")
    p.add_argument("--router-seed", type=int, default=None, help="RNG seed of the router weights (default 0)")
    p.add_argument("--router-layers", type=_layers, default=None,
                   help="LoRA-MoE: comma-separated layer indices to route (default: all)")
    p.add_argument("--allow-other-base", action="store_true", default=None,
                   help="LoRA-MoE: compose btx experts even if they were trained on another base (their recorded "
                   "digest)")
    p.add_argument("--shared", default=None, choices=SHARED,
                   help="--mode ffn: non-FFN weights averaged over the experts or taken from the seed")
    p.add_argument("--max-drift", type=float, default=None,
                   help="--mode ffn: largest relative L2 distance of an expert from the seed (default 0.5)")
    p.add_argument("--format", default="btx", choices=("btx", "mergoo", "mixtral"))
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype of the result (default: float32); bfloat16 halves host memory and files")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")
    return p


def _summary(moe: Pretrained, mode: str, fmt: str, out) -> str:
    if mode == "ffn":
        m = moe.config.moe
        return (f"wrote {fmt} FFN-MoE to {out}: {m.num_experts} FFN experts"
                f"{' (the last is the seed)' if m.seed_expert else ''}, top-{m.top_k}")
    spec = moe.config.adapter
    return (f"wrote {fmt} LoRA-MoE to {out}: {len(spec.experts)} experts{' + seed' if spec.seed_expert else ''}, "
            f"top-{spec.top_k}, targets {','.join(spec.targets)}")


def _spec_options(args: argparse.Namespace) -> dict:
    """{spec field: value} of the spec flags given."""
    return {k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k) is not None}


def _compose(args: argparse.Namespace) -> tuple[Pretrained, object]:
    spec = make_spec(args.mode, _spec_options(args), lambda field: "--" + field.replace("_", "-"))
    sources = {link for d in (args.base, *args.experts) for link in btx.links(d)}
    check_destination(args.out, overwrite=args.overwrite, sources=sources)    # before the (slow) composition
    moe = compose(args.base, args.experts, spec, dtype=args.dtype, allow_pickle=args.allow_pickle)
    return moe, moe.save_pretrained(args.out, format=args.format, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/compose.py: exit 0, or 2 with one line on stderr; nothing is written then."""
    args = build_parser().parse_args(argv)
    try:
        with stopping_cleanly(args.out):      # SIGTERM / Ctrl-C: one line, nothing left at --out
            moe, out = run_cli(lambda: _compose(args))
    except SystemExit as e:          # a user error or a signal: one line printed
        return int(e.code)
    print(_summary(moe, args.mode, args.format, out))
    return 0
