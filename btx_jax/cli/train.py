"""Train one phase; rerunning the same command resumes from the latest checkpoint.

    btx train --config=expert:wiki --workdir=runs/wiki
    btx train --config=expert:synthetic --workdir=/tmp/x --config.train.steps=2      # a config override
    btx train --config=path/to/my_config.py:preset --workdir=runs/mine

--config is a packaged phase config by name (pretrain, expert, router, sft, each with a preset after `:`) or a
config file's path (btx_jax/configs/__init__.py); --config.KEY=VALUE overrides one of its keys."""
from __future__ import annotations

from typing import Sequence

from btx_jax.command_line import parse_flags, run_cli, stopping_cleanly


def main(argv: Sequence[str]) -> int:
    prog = "btx train"
    from absl import flags, logging
    from ml_collections import config_flags

    from btx_jax import disk
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "phase config: NAME[:PRESET] or FILE.py[:PRESET]",
                                             flag_values=fv, sys_argv=[prog, *argv])   # its overrides
    workdir = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics.jsonl, final/)",
                                  flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    parse_flags([prog, *argv], fv, __doc__)
    logging.set_verbosity(logging.WARNING)   # orbax logs every file at INFO
    disk.quiet_background_faults()           # a full disk: one line, not orbax's writer threads' tracebacks

    def run():
        from btx_jax.checkpoint.tensor_files import check_destination
        from btx_jax.train.trainer import train
        check_destination(workdir.value, overwrite=None, what=f"--workdir {workdir.value}")   # before any work
        train(config.value, workdir.value)

    from btx_jax.train.host_memory import returning_freed_memory
    # SIGTERM / Ctrl-C: a checkpoint after the step in flight, exit 143 / 130; freed host memory handed back
    with stopping_cleanly(f"--workdir {workdir.value}"), returning_freed_memory():
        run_cli(run)
    return 0
