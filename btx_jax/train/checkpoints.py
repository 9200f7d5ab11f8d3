"""Training checkpoints with orbax's CheckpointManager: every N steps and at the end, keep the last K.  Each
step holds the trainable parameters, optimizer state, step and RNG (not the frozen weights: they come from the
model's source, and their digest is kept to check a resume against), the data iterator's state and the
resolved config; resuming with an incompatible config is refused.

Host memory.  A save copies the state to host memory a batch of leaves at a time (orbax's
`save_device_host_concurrent_gb`: at most HOST_BUDGET bytes, or one device's shard of the largest leaf when that
is larger) and writes each batch before copying the next, so it holds at most about one leaf besides what the
devices hold; it is synchronous (the loop waits for the write) because an asynchronous save would need a host
copy of the whole trainable and optimizer state while the next step runs (the next step donates the state's
buffers).  A restore reads at most HOST_BUDGET bytes (or one device's shard of the largest leaf) at a time
(`restore_concurrent_gb`), each read placed straight into its sharding.  orbax refuses a write or a read above
its limit, so the limits follow the largest shard (btx_jax/checkpoint/btx.py `bounded_handler`).

Integrity.  orbax writes each step into a temporary directory and renames it when complete; leftover temporary
directories of an interrupted save are removed when the manager opens.  On resume (`resume`) the newest step
is restored; if that fails (truncated or missing files, damaged metadata) the step is reported in one line,
renamed to `<step>.damaged` (never deleted) and the next older step is tried.  If no step restores, nothing
is renamed and resume stops with a CheckpointError saying so.  Out-of-space and permission errors while
saving become one-line DiskErrors naming the directory (btx_jax/disk.py).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from btx_jax import disk, schema
from btx_jax.checkpoint.btx import HOST_BUDGET, bounded_handler, largest_shard_bytes
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.config import ConfigError
from btx_jax.train.hooks import Hook, Loop
from btx_jax.train.host_memory import release_freed_memory

DAMAGED_SUFFIX = ".damaged"
TMP_SUFFIX = ".orbax-checkpoint-tmp"     # orbax's in-progress step directories

# Config keys that may change between a run and its resumption (btx_jax/schema.py's `resumable` fields).
RESUMABLE_CHANGES = schema.resumable_keys()


class Checkpointer:
    def __init__(self, directory: Path, every: int, keep: int):
        self.directory = Path(directory).absolute()
        self.nbytes = None
        self.every, self.keep = max(int(every), 1), int(keep)
        self.manager, self._budget = None, 0
        self._open(HOST_BUDGET)

    def _open(self, budget: int) -> ocp.CheckpointManager:
        """The manager, reopened when a save or restore moves a shard larger than the current budget (orbax
        refuses a write or read that does not fit its limit)."""
        if self.manager is not None and budget <= self._budget:
            return self.manager
        if self.manager is not None:
            self.manager.close()
        json_handler = ocp.JsonCheckpointHandler
        with disk.writing(self.directory):
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(save_interval_steps=self.every, max_to_keep=self.keep,
                                                     enable_async_checkpointing=False, create=True,
                                                     cleanup_tmp_directories=True),
                item_handlers={"state": bounded_handler(budget), "data": json_handler(),
                               "config": json_handler(), "frozen": json_handler()})
        self._budget = budget
        return self.manager

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_step(self) -> int | None:
        """The newest step whose save has completed (waits for the one in flight)."""
        self.wait()
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config: dict, frozen_digest: str,
             force: bool = False) -> bool:
        """Save the state without its frozen weights, the data iterator state, the config and the digest."""
        lean = {k: v for k, v in state.items() if k != "frozen"}
        if self.nbytes is None:
            self.nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(lean))
            self._open(largest_shard_bytes(lean))
        with self._guard():
            if force or self.manager.should_save(step):
                disk.require(self.directory, self.nbytes)
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(lean), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config), frozen=ocp.args.JsonSave({"digest": frozen_digest})), force=force)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state) -> tuple[dict, dict, str]:
        """(state without frozen weights, placed with the abstract state's shardings; data iterator state;
        digest of the frozen weights it was trained with)."""
        lean = {k: v for k, v in abstract_state.items() if k != "frozen"}
        manager = self._open(largest_shard_bytes(lean))
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(lean, restore_args=ocp.checkpoint_utils.construct_restore_args(lean)),
            data=ocp.args.JsonRestore(), frozen=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["frozen"]["digest"]

    def resume(self, abstract_state, check: Callable[[dict], None]) -> tuple[int, dict, dict, str] | None:
        """(step, state, data state, frozen digest) of the newest step that restores, None when there is no
        checkpoint; the state lacks the frozen weights.

        `check(saved_config)` may refuse a step (ConfigError): that is not damage and propagates.  Newer steps
        that fail to restore are set aside (renamed) once an older one has restored."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.saved_config(step)
            except Exception as e:     # any failure to read it back is damage, whatever the checkpoint holds
                failed.append((step, e))
                continue
            check(saved)
            try:
                state, data_state, digest = self.restore(step, abstract_state)
            except Exception as e:
                failed.append((step, e))
                continue
            for bad, e in failed:
                self._set_aside(bad, e)
            if failed:
                self.manager.reload()
            return step, state, data_state, digest
        if failed:
            steps = ", ".join(str(s) for s, _ in failed)
            raise CheckpointError(f"{self.directory}: no checkpoint restores (steps {steps}; newest: "
                                  f"{_reason(failed[0][1])}); nothing was renamed: move the directory away to "
                                  "start over, or point --workdir elsewhere")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
        if jax.process_index() == 0:
            os.replace(src, dst)
        print(f"[btx] checkpoint step {step} cannot be restored ({_reason(error)}): set aside as {dst.name}, "
              "using the next older step", flush=True)

    def wait(self) -> None:
        with self._guard():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _guard(self):
        """Disk faults -> DiskError naming the directory; the failed step's temporary directory is removed."""
        try:
            with disk.writing(self.directory, self.nbytes):
                yield
        except disk.DiskError:
            for tmp in self.directory.glob(f"*{TMP_SUFFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class CheckpointHook(Hook):
    """Saves every `every` steps, at the last step and when a stop signal arrived (after fetching the step's
    metrics, so that a non-finite step is never saved); keeps `loop.saved_step` current."""

    def __init__(self, ckpt: Checkpointer, frozen_digest: str):
        self.ckpt, self.digest = ckpt, frozen_digest

    def on_step(self, loop: Loop) -> None:
        if loop.step % self.ckpt.every and not loop.done and not loop.stopping:
            return
        loop.sync()
        self.ckpt.save(loop.step, loop.state, loop.data.get_state(), loop.cfg, self.digest, force=True)
        loop.saved_step = self.ckpt.saved_step()
        release_freed_memory()

    def on_end(self, loop: Loop) -> None:
        self.ckpt.wait()


def _reason(error: Exception) -> str:
    """The first line of an exception's message, shortened (TensorStore messages run to pages)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_compatible(saved: dict, current: dict, directory: Path) -> None:
    """ConfigError naming the first key that differs and may not change across a resume."""
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (saved, current))
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(f"{directory}: cannot resume, config key {key!r} was {a.get(key)!r} and is now "
                              f"{b.get(key)!r} (use a new --workdir, or restore the old value)")

