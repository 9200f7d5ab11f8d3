"""Tokenise a config's data sources into their stores ahead of training (every core by default).

    python scripts/prepare_data.py --config=configs/expert.py:wiki
    python scripts/prepare_data.py --config=configs/sft.py:tiny --config.data.cache_dir=/shared/btx-data

Builds the store of every training source and every `eval_path` (btx_jax/data/store.py), with a progress
bar in tokens/s; rerunning after a kill resumes at the first unfinished shard, and a finished store is only
checked. Training with the same config (and `cache_dir`) then starts from the stores at once. Bad input is
one line on stderr and exit code 2; SIGTERM or Ctrl-C is one line naming the finished shards kept, exit 143 / 130.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from btx_jax.cli import run_cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "phase config file (configs/<phase>.py[:preset])")
_NUM_PROC = flags.DEFINE_integer("num_proc", None, "tokenising processes (default: the config's, else every core)")
flags.mark_flags_as_required(["config"])


def prepare():
    from btx_jax.data import prepare_config
    from btx_jax.train.validate import check_data

    check_data(_CONFIG.value.data.to_dict())
    prepare_config(_CONFIG.value.data, num_proc=_NUM_PROC.value)


def main(argv):
    del argv
    from btx_jax.data.interrupt import interruptible_build

    with interruptible_build():          # SIGTERM / Ctrl-C: one line saying which shards are kept, exit 143 / 130
        run_cli(prepare)


if __name__ == "__main__":
    app.run(main)
