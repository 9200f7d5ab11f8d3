"""Dead-training detection: a run whose logged steps show all-zero gradients, or a loss sitting at ln(vocab)
(the loss of a uniform prediction: the model outputs nothing learned), for `patience` logged steps in a row
gets one loud warning on stderr.  Training continues (the user decides); the non-finite stop is separate
(trainer._check).

The ln(vocab) check is off for synthetic data: on uniformly random tokens ln(vocab) is the best possible loss.
"""
from __future__ import annotations

import math
import sys

from tqdm import tqdm

PATIENCE = 3            # logged steps in a row
LOSS_RTOL = 1e-3        # |loss - ln(vocab)| / ln(vocab) below this counts as "at ln(vocab)"


class TrainingHealth:
    def __init__(self, vocab_size: int, check_loss: bool = True, patience: int = PATIENCE):
        self.uniform_loss = math.log(vocab_size)
        self.check_loss, self.patience = check_loss, patience
        self.zero_grads = self.at_uniform = 0
        self.warned = False

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
