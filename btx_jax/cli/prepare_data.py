"""Tokenise a config's data sources into their stores ahead of training (every core by default).

    btx prepare-data --config=expert:wiki
    btx prepare-data --config=sft:tiny --config.data.cache_dir=/shared/btx-data --num-proc=4

Builds the store of every training source and every `eval_path` (btx_jax/data/store.py), with a progress
bar in tokens/s; rerunning after a kill resumes at the first unfinished shard, and a finished store is only
checked. Training with the same config (and `cache_dir`) then starts from the stores at once. Bad input is
one line on stderr and exit code 2; SIGTERM or Ctrl-C is one line naming the finished shards kept, exit 143 / 130.
"""
from __future__ import annotations

from typing import Sequence

from btx_jax.command_line import parse_flags, run_cli


def main(argv: Sequence[str]) -> int:
    prog = "btx prepare-data"
    from absl import flags
    from ml_collections import config_flags

    from btx_jax.data.interrupt import interruptible_build
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "phase config: NAME[:PRESET] or FILE.py[:PRESET]",
                                             flag_values=fv, sys_argv=[prog, *argv])   # its overrides
    num_proc = flags.DEFINE_integer("num-proc", None, "tokenising processes (default: the config's, else every "
                                    "core)", lower_bound=1, flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)
    parse_flags([prog, *argv], fv, __doc__)

    def prepare():
        from btx_jax.data import prepare_config
        from btx_jax.train.validate import check_data
        check_data(config.value.data.to_dict())
        prepare_config(config.value.data, num_proc=num_proc.value)

    with interruptible_build():          # SIGTERM / Ctrl-C: one line saying which shards are kept, exit 143 / 130
        run_cli(prepare)
    return 0
