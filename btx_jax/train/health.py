"""Dead-training detection: a run whose logged steps show all-zero gradients, or a loss sitting at ln(vocab)
(the loss of a uniform prediction: the model outputs nothing learned), for `patience` logged steps in a row
gets one loud warning on stderr.  Training continues (the user decides).  A non-finite loss or gradient
stops training (TrainingError naming the step and the last good checkpoint) unless train.skip_nonfinite.

The ln(vocab) check is off for synthetic data: on uniformly random tokens ln(vocab) is the best possible loss.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from tqdm import tqdm

from btx_jax.errors import UserError
from btx_jax.train.hooks import Hook, Loop

PATIENCE = 3            # logged steps in a row
LOSS_RTOL = 1e-3        # |loss - ln(vocab)| / ln(vocab) below this counts as "at ln(vocab)"


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (non-finite loss, ...); the message says what to do."""


class TrainingHealth(Hook):
    def __init__(self, vocab_size: int, check_loss: bool = True, patience: int = PATIENCE,
                 skip_nonfinite: bool = False):
        self.uniform_loss = math.log(vocab_size)
        self.check_loss, self.patience, self.skip_nonfinite = check_loss, patience, skip_nonfinite
        self.zero_grads = self.at_uniform = 0
        self.warned = False

    def on_metrics(self, loop: Loop, step: int, metrics: dict) -> None:
        """Stop on a non-finite loss or gradient (before the step is logged or checkpointed); watch the logged
        steps for dead training."""
        loss = float(metrics["loss"])
        if not self.skip_nonfinite and not all(np.isfinite(float(metrics[k]))
                                               for k in ("loss", "grad_norm", "update_norm")):
            what = "loss" if not np.isfinite(loss) else "gradient"
            kept = (f"the last good checkpoint (step {loop.saved_step}) is kept" if loop.saved_step is not None
                    else "no checkpoint was saved")
            raise TrainingError(f"non-finite {what} at step {step} (loss {loss}): training stopped; {kept} (lower "
                                "train.lr, check the data, or set train.skip_nonfinite=True)")
        if loop.logged(step):
            self.observe(step, metrics)

    def observe(self, step: int, metrics: dict) -> str | None:
        """Feed one logged step's host metrics; returns (and prints) the warning the first time it fires."""
        self.zero_grads = self.zero_grads + 1 if float(metrics["grad_norm"]) == 0.0 else 0
        near = abs(float(metrics["loss"]) - self.uniform_loss) <= LOSS_RTOL * self.uniform_loss
        self.at_uniform = self.at_uniform + 1 if near and self.check_loss else 0
        if self.warned or max(self.zero_grads, self.at_uniform) < self.patience:
            return None
        self.warned = True
        what = ("the gradient norm has been exactly 0" if self.zero_grads >= self.patience else
                f"the loss has been {float(metrics['loss']):.4f} = ln(vocab) (a uniform prediction)")
        text = (f"[btx] WARNING: training looks dead at step {step}: {what} for {self.patience} logged steps in a "
                "row, so nothing is being learned (train.lr too high or too low? frozen phase patterns? broken "
                "data?)")
        tqdm.write(text, file=sys.stderr)        # on its own line, above the progress bar
        return text
