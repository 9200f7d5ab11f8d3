"""What the training loop calls, and the state it shares with them.

    class Printer(Hook):
        def on_metrics(self, loop, step, metrics):       # host metrics of `step`, once per step, in order
            print(step, metrics["loss"])
    train(config, workdir, hooks=[Printer()])

The loop (btx_jax/train/trainer.py) dispatches step n + 1 before it fetches step n's metrics, so the host
never waits for the device in a step; a hook that needs the current step's metrics now (a checkpoint, an
evaluation) calls `loop.sync()`.  Each step, after dispatching it, the loop delivers the previous step's
metrics to every hook's `on_metrics`, then calls every hook's `on_step(loop)`, in order; at the end (every
step run, the last metrics delivered) `on_end(loop)`, and `close()` however the run ended (the caller's
hooks; the built-in ones close their files and checkpoint manager).  The built-in hooks, in this order:
TrainingHealth (train/health.py: stops on a non-finite loss, warns when training looks dead), MetricsLog
(train/metrics_log.py: metrics.jsonl, TensorBoard, the progress bar), CheckpointHook (train/checkpoints.py)
and, with train.eval_every, HeldOutEval (train/held_out.py); a user's hooks run after them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from btx_jax.schema import Train


class Hook:
    """Override what you need; every method does nothing by default."""

    def on_step(self, loop: "Loop") -> None:
        """After step `loop.step` was dispatched (`loop.state` is its result, on device)."""

    def on_metrics(self, loop: "Loop", step: int, metrics: dict) -> None:
        """Host metrics of `step` (loss, grad_norm, update_norm, tokens, lr, step, ...)."""

    def on_end(self, loop: "Loop") -> None:
        """Every step ran and its metrics were delivered."""

    def close(self) -> None:
        """The loop ended (normally or not)."""


@dataclasses.dataclass
class Loop:
    """The training loop's state: what hooks read (and CheckpointHook's `saved_step`, which it writes)."""
    cfg: dict                              # the resolved config
    train: Train                           # its train section, typed (btx_jax/schema.py)
    workdir: Path
    start: int                             # the step this run started (resumed) from
    step: int                              # steps done; `state` is the train state after them
    state: dict                            # {step, trainable, frozen, opt_state, rng}; the next step donates it
    data: Any                              # the training batch iterator (get_state / set_state / stats)
    hooks: Sequence[Hook]
    lr_at: Callable[[int], float]          # the learning-rate schedule
    saved_step: int | None = None          # the newest checkpoint on disk
    stopping: int | None = None            # a stop signal arrived: the loop ends after this step
    last: dict = dataclasses.field(default_factory=dict)     # the latest delivered metrics
    pending: tuple | None = None           # (step, device metrics) not fetched yet

    @property
    def total_steps(self) -> int:
        return self.train.steps

    @property
    def done(self) -> bool:
        return self.step == self.total_steps

    def advance(self, state: dict, metrics: dict) -> None:
        """Step `step + 1` was dispatched: deliver the previous step's metrics (now that the device has the
        next step queued), keep this one's pending."""
        previous, self.pending = self.pending, (self.step + 1, metrics)
        self.state, self.step = state, self.step + 1
        if previous is not None:
            self._deliver(*previous)

    def sync(self) -> None:
        """Deliver the pending metrics now (waits for the device)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._deliver(*pending)

    def _deliver(self, step: int, metrics: dict) -> None:
        host = jax.device_get(metrics)
        host["lr"] = float(self.lr_at(step - 1))
        host["step"] = step
        for hook in self.hooks:
            hook.on_metrics(self, step, host)
        self.last = host

    def logged(self, step: int) -> bool:
        """Whether `step` is logged (every train.log_every steps and the last)."""
        return step % self.train.log_every == 0 or step == self.total_steps
