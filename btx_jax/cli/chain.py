"""The chain of a lean checkpoint: every directory its frozen weights come from, each link's status
(`btx chain`; docs/finals.md).

    btx chain runs/btx/sft/final

prints one line per link, indented under the checkpoint that names it: `present` / `MISSING`, for a lean
checkpoint whether the frozen weights it names still have the recorded digest (`digest ok` / `CHANGED`), for
a version in `<run>/finals/` whether it is the run's latest, and at the end the finals built on the checkpoint.
Exit code 0 when every link is present and unchanged, 1 otherwise, 2 on bad input (one line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax.numpy as jnp

from btx_jax import mesh as mesh_lib
from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.command_line import ArgumentParser, run_cli
from btx_jax.config import ConfigError
from btx_jax.model import abstract_leaves
from btx_jax.pretrained import ChainError, reference_source

BROKEN = ("MISSING", "CHANGED", "UNREADABLE")


def _version_note(directory: Path) -> str:
    """For a version in <run>/finals/: whether <run>/final names it."""
    final = directory.parent.parent / "final"
    if directory.parent.name != btx.FINALS or not (final / btx.FINAL_POINTER).is_file():
        return ""
    latest = btx.resolve(final)
    return ", latest" if latest == directory else f", older version ({final} now names {latest.name})"


def _digest_status(directory: Path, config, reference: dict) -> str:
    if not reference.get("digest"):
        return "no digest recorded"
    if not all(p.is_dir() for p in btx.named(reference)):
        return "digest not checked (a link is missing)"
    stored = btx.stored_shapes(directory)
    target = mesh_lib.sharded_target({p: s for p, s in abstract_leaves(config).items() if p not in stored}, None,
                                     mesh_lib.DEFAULT_RULES, jnp.float32)
    try:
        found = btx.digest(reference_source(reference, config).fill(target))
    except ChainError as e:          # a link further up is broken: listed on its own line
        return f"digest not checked ({e.problem})"
    return "digest ok" if found == reference["digest"] else f"CHANGED (digest {reference['digest']}, now {found})"


def report(path: str | Path) -> list[str]:
    """The chain listing of `path`, one line per link."""
    lines: list[str] = []
    seen: set[Path] = set()

    def visit(d: Path, depth: int) -> None:
        pad = "  " * depth
        try:
            d = btx.resolve(d)
            if not d.is_dir():
                lines.append(f"{pad}{d}: MISSING")
                return
            if not btx.is_btx(d):
                lines.append(f"{pad}{d}: present")
                return
            config, reference = btx.read_config(d)
            status = f", {_digest_status(d, config, reference)}" if reference else ", self-contained"
        except (CheckpointError, ConfigError) as e:
            lines.append(f"{pad}{d}: UNREADABLE ({e})")
            return
        lines.append(f"{pad}{d}: present{status}{_version_note(d)}{' (listed above)' if d in seen else ''}")
        if d not in seen:
            seen.add(d)
            for up in btx.named(reference):
                visit(up, depth + 1)

    top = Path(path)
    if not top.is_dir():
        raise CheckpointError(f"{top}: model directory not found")
    visit(top, 0)
    users = btx.dependents(top)
    lines += [f"built on it: {u}" for u in users] or ["built on it: nothing registered"]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="btx chain", description=__doc__.split("\n\n")[0],
                       epilog="example: btx chain runs/btx/sft/final")
    p.add_argument("model", metavar="DIR", help="a btx checkpoint, e.g. <run>/final")
    args = p.parse_args(argv)
    try:
        lines = run_cli(lambda: report(args.model))
    except SystemExit as e:
        return int(e.code or 0)
    print("\n".join(lines))
    return 1 if any(word in line for line in lines for word in BROKEN) else 0
