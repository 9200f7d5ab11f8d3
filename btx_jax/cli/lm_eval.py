"""`btx lm-eval` (and the `btx-lm-eval` console script): lm-evaluation-harness's own command line with the `btx`
model registered (btx_jax/eval/harness.py) and the bundled offline tasks (btx_jax/eval/tasks/) on its task path.
Task files and the `btx` model's arguments are checked before lm-eval starts; every user error, lm-eval's usage
errors included, is one line `error: ...` and exit 2."""
from __future__ import annotations

import argparse
import glob
import sys
from typing import Sequence
from unittest import mock

from btx_jax.command_line import fail, run_cli
from btx_jax.config import ConfigError
from btx_jax.eval.harness import TASKS_DIR, check_model_args, check_task_file

EXAMPLE = ("btx lm-eval --model btx --model_args pretrained=runs/sft/final --tasks btx_jcommonsenseqa "
           "--batch_size 16 --limit 50")


def check_args(args: list[str]) -> None:
    """Before lm-eval starts: every `--tasks` YAML file parses and the `btx` model's `--model_args` are valid."""
    for flag, value in zip(args[:-1], args[1:]):
        if flag == "--tasks":
            for t in value.split(","):
                if t.endswith(".yaml"):
                    for file in glob.glob(t) or [t]:
                        check_task_file(file)
        if flag == "--model_args" and "--model" in args and args[args.index("--model") + 1] == "btx":
            check_model_args(value)


def _evaluate(args: list[str]) -> None:
    from lm_eval.__main__ import cli_evaluate
    check_args(args)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args) and \
            any(a in ("--tasks", "run", "ls", "validate") or a.startswith("--tasks=") for a in args):
        args = [*args, "--include_path", str(TASKS_DIR)]
    if any(a in ("-h", "--help") for a in args):
        print(f"example:\n  {EXAMPLE}\n")
    saved, sys.argv = sys.argv, ["lm-eval", *args]       # lm-eval's command line reads sys.argv only
    try:
        with mock.patch.object(argparse.ArgumentParser, "error",     # its usage errors: one line, exit 2
                               lambda parser, message: fail(f"btx lm-eval: {message}")):
            cli_evaluate()
    except ValueError as e:        # the harness's own "Tasks not found: ..." and friends
        if "not found" not in str(e):
            raise
        raise ConfigError(str(e)) from None
    finally:
        sys.argv = saved


def main(argv: Sequence[str] | None = None) -> int:
    """`btx lm-eval` (and `btx-lm-eval`): lm-eval's command line with `btx` registered and btx_jax/eval/tasks on the
    task path.  0, or 2 after one line `error: ...` on stderr for a user error (btx_jax/cli run_cli)."""
    try:
        run_cli(lambda: _evaluate(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as e:
        return int(e.code or 0)
    return 0

