"""Training checkpoints with orbax's CheckpointManager: every N steps and at the end, keep the last K,
saved asynchronously.  Each step holds the trainable parameters, optimizer state, step and RNG (not the frozen
weights: the digest of those is kept instead and checked on resume), the data iterator's state and the
resolved config; resuming with an incompatible config is refused."""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import traverse_util

from btx_jax.config import ConfigError

# Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.remat", "train.attention", "train.attention_block", "mesh", "distributed", "export", "eval")


class Checkpointer:
    def __init__(self, directory: Path, every: int, keep: int):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=int(keep),
                                                 enable_async_checkpointing=True, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config: dict, frozen_digest: str) -> bool:
        """Save the state without its frozen weights (they come from the model's source; their digest is
        kept to check a resume against), the data iterator state and the config."""
        lean = {k: v for k, v in state.items() if k != "frozen"}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(lean), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config), frozen=ocp.args.JsonSave({"digest": frozen_digest})), force=True)

    def saved_digest(self, step: int) -> str | None:
        return self.manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore()))["frozen"]["digest"]

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """(state placed with the abstract state's shardings, data iterator state)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: dict, current: dict, directory: Path) -> None:
    """ConfigError naming the first key that differs and may not change across a resume."""
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (saved, current))
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(f"{directory}: cannot resume, config key {key!r} was {a.get(key)!r} and is now "
                              f"{b.get(key)!r} (use a new --workdir, or restore the old value)")

