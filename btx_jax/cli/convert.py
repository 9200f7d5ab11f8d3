"""Convert checkpoints between Hugging Face (Llama, Mixtral) / PEFT / mergoo and btx_jax's own format.

    btx convert hf-to-btx  SRC DST [--dtype bfloat16] [--allow-pickle] [--overwrite]
    btx convert btx-to-hf  SRC DST [--max-shard-size 5GB] [--dtype bfloat16] [--overwrite]
    btx convert peft-to-btx ADAPTER DST --base HF_BASE
    btx convert btx-to-peft SRC DST
    btx convert mergoo-to-btx SRC DST
    btx convert btx-to-mergoo SRC DST [--max-shard-size 5GB]
    btx convert mixtral-to-btx SRC DST
    btx convert btx-to-mixtral SRC DST [--max-shard-size 5GB]     (FFN-MoE <-> MixtralForCausalLM)
    btx convert btx-to-btx SRC DST --self-contained   (a lean final's chain in one directory)

Every tensor's name and shape is checked against the config.  On bad input (missing directory or file,
foreign architecture, missing / misshapen tensor, corrupt safetensors, pickle checkpoint without
--allow-pickle, an index.json shard or a frozen_from outside the expected places without
BTX_ALLOW_EXTERNAL_FILES=1) it prints ONE line to stderr and exits with code 2.  DST is checked before any work:
a file, a symlink, a path below a file, SRC or a directory inside it, or (with --overwrite) a directory holding
SRC or any directory SRC's chain needs is refused.  DST is written into a temporary sibling directory and renamed at
the end, so an error never leaves a half-written DST; SIGTERM / Ctrl-C print one line, remove it and exit 143 / 130.

The CLI is `btx convert` (it calls `main`).  A new conversion is one entry in CONVERSIONS: which format SRC must be,
how to load it, which format to save.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import CheckpointError, check_destination
from btx_jax.command_line import ArgumentParser, parse_bytes, run_cli, stopping_cleanly
from btx_jax.config import DTYPES, ConfigError
from btx_jax.pretrained import check_savable, detect_format, open_model



@dataclasses.dataclass(frozen=True)
class Conversion:
    help: str
    source_format: str                 # what pretrained.detect_format(SRC) must say
    save_format: str                   # Pretrained.save_pretrained(format=...)
    load_kwargs: Callable[[argparse.Namespace], dict] = lambda args: {}
    source_dir: Callable[[argparse.Namespace], str] = lambda args: args.src     # the directory load_pretrained reads
    shards: bool = False               # takes --max-shard-size
    extra_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="Hugging Face Llama directory the adapter was trained on")


def _add_self_contained(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--self-contained", action="store_true", required=True,
                        help="store every leaf: DST needs none of the directories SRC's chain names (docs/finals.md)")


CONVERSIONS: dict[str, Conversion] = {
    "hf-to-btx": Conversion("Hugging Face Llama (config.json + safetensors) -> btx_jax checkpoint", "hf", "btx"),
    "btx-to-hf": Conversion("btx_jax checkpoint -> Hugging Face Llama (LoRA must be merged: --merge-lora)",
                            "btx", "hf", shards=True),
    "peft-to-btx": Conversion("PEFT LoRA adapter (with --base) -> btx_jax checkpoint", "peft", "btx",
                              load_kwargs=lambda args: {"adapter": args.src}, source_dir=lambda args: args.base,
                              extra_args=_add_base),
    "btx-to-peft": Conversion("btx_jax LoRA checkpoint -> PEFT adapter (adapter_config.json + safetensors)",
                              "btx", "peft"),
    "mergoo-to-btx": Conversion("mergoo LoRA-MoE checkpoint -> btx_jax checkpoint", "mergoo", "btx"),
    "btx-to-mergoo": Conversion("btx_jax LoRA-MoE checkpoint -> mergoo checkpoint", "btx", "mergoo", shards=True),
    "mixtral-to-btx": Conversion("Hugging Face Mixtral (MixtralForCausalLM) -> btx_jax FFN-MoE checkpoint",
                                 "mixtral", "btx"),
    "btx-to-mixtral": Conversion("btx_jax FFN-MoE checkpoint -> Hugging Face Mixtral", "btx", "mixtral", shards=True),
    "btx-to-btx": Conversion("btx_jax (lean) checkpoint -> self-contained btx_jax checkpoint", "btx", "btx",
                             extra_args=_add_self_contained),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="btx convert", description=__doc__.split("\n\n", 2)[0] + "\n\n" +
                            __doc__.split("\n\n", 2)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, conv in CONVERSIONS.items():
        p = sub.add_parser(name, help=conv.help, description=conv.help)
        p.add_argument("src", metavar="SRC")
        p.add_argument("dst", metavar="DST")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="parameter dtype of the result (default: float32)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="read pytorch_model*.bin pickle files (they can execute code: only trusted sources)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if conv.shards:
            p.add_argument("--max-shard-size", default="5GB",
                           help="largest safetensors shard, e.g. 5GB (10^9), 500MB, 2GiB (default 5GB)")
        if conv.save_format == "hf":
            p.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the base weights")
        conv.extra_args(p)
    return parser


def _checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in directory.glob(pattern))


class _Progress:
    """tqdm bar over bytes (no-op when disabled or tqdm is missing)."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                                file=sys.stderr, leave=False, dynamic_ncols=True,
                                disable=None)   # None: only on a terminal, so logs and pipes stay clean
            except ImportError:
                pass

    def __call__(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def convert(args: argparse.Namespace) -> Path:
    """Run one conversion; raises btx_jax's CheckpointError / ConfigError on bad input."""
    conv = CONVERSIONS[args.command]
    src, dst = Path(args.src), Path(args.dst)
    max_shard = _shard_size(args.max_shard_size) if conv.shards else None
    load_dir = Path(conv.source_dir(args))
    check_destination(dst, overwrite=args.overwrite, sources={*btx.links(src), *btx.links(load_dir)})
    found = detect_format(src)
    if found != conv.source_format:
        raise CheckpointError(f"{src}: is a {found} checkpoint, not {conv.source_format} "
                              f"(use {found}-to-* / *-to-{found} conversions)")
    kwargs = dict(conv.load_kwargs(args))
    kwargs["dtype"] = args.dtype
    show = not args.no_progress
    progress = _Progress(f"reading {load_dir.name}", _checkpoint_bytes(load_dir), show)
    try:
        source = open_model(load_dir, adapter=kwargs.pop("adapter", None), allow_pickle=args.allow_pickle,
                            progress=progress)                  # configs and tensor headers only
        merge = getattr(args, "merge_lora", False)
        if conv.save_format == "hf" and source.config.adapter is not None and not merge:
            raise CheckpointError(f"{src}: has LoRA adapters; pass --merge-lora to fold them into the base "
                                  "weights, or use btx-to-peft / btx-to-mergoo")
        try:
            check_savable(source.config, conv.save_format, merge_lora=merge)     # before any weight is read
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e}") from None
        pre = source.load(**kwargs)
    finally:
        progress.close()
    save_kwargs = {"format": conv.save_format, "overwrite": args.overwrite}
    if max_shard is not None:
        save_kwargs["max_shard_bytes"] = max_shard
    if conv.save_format == "hf":
        save_kwargs["merge_lora"] = args.merge_lora
        import jax
        total = sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(pre.params))
        save_kwargs["progress"] = _Progress(f"writing {dst.name}", total, show)
    try:
        pre.save_pretrained(dst, **save_kwargs)
    finally:
        if "progress" in save_kwargs:
            save_kwargs["progress"].close()
    return dst


def _shard_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as e:
        raise CheckpointError(f"--max-shard-size {e}") from None


def _convert_user_errors(args: argparse.Namespace) -> Path:
    try:
        return convert(args)
    except (CheckpointError, ConfigError):
        raise
    except ValueError as e:      # any other bad value reported by btx_jax is still bad user input
        raise CheckpointError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0 on success, 2 on bad input (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        with stopping_cleanly(args.dst):
            run_cli(lambda: _convert_user_errors(args))
    except SystemExit as e:
        return int(e.code or 0)
    print(f"wrote {args.dst}")
    return 0

