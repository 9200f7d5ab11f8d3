"""Train one phase:  python scripts/train.py --config=configs/expert.py:wiki --workdir=runs/wiki

Overrides: --config.train.steps=100.  Rerunning the same command resumes from the latest checkpoint."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from btx_jax import disk  # noqa: E402
from btx_jax.cli import parse_flags, run_cli, stopping_cleanly  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "phase config file (configs/<phase>.py[:preset])")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (checkpoints, metrics.jsonl, final/)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)   # orbax logs every file at INFO
    disk.quiet_background_faults()           # a full disk: one line, not orbax's writer threads' tracebacks
    from btx_jax.checkpoint.tensor_files import check_destination
    from btx_jax.train.host_memory import returning_freed_memory
    from btx_jax.train.trainer import train

    def run():
        check_destination(_WORKDIR.value, overwrite=None, what=f"--workdir {_WORKDIR.value}")   # before any work
        return train(_CONFIG.value, _WORKDIR.value)

    # SIGTERM / Ctrl-C: a checkpoint after the step in flight, exit 143 / 130; freed host memory handed back
    with stopping_cleanly(f"--workdir {_WORKDIR.value}"), returning_freed_memory():
        run_cli(run)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
