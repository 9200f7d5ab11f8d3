"""Mixture sampling: which source each row of a global batch comes from.

Rows are allocated by stratified (deficit) sampling: the next row goes to the source whose row
count lags its target share the most, so after every batch each source's count is within one row
of ratio * rows_so_far. The positions of the sources' rows inside each batch are then shuffled by
a generator fixed by (seed, batch index), so the result depends only on the seed and is
reproducible on every process. Ratios are shares of rows, i.e. of tokens (all rows have seq_len).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from btx_jax.data.errors import DataError


def normalize_ratios(names: Sequence[str], ratios: Sequence[float]) -> np.ndarray:
    """Ratios as probabilities; DataError when one is negative/non-finite or all are zero."""
    for name, r in zip(names, ratios):
        if not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise DataError(f"source {name!r}: ratio must be a finite number >= 0, got {r!r}")
    total = float(sum(ratios))
    if total <= 0:
        raise DataError(f"mixture ratios are all zero (sources: {', '.join(names)})")
    return np.asarray(ratios, np.float64) / total


def allocate_batch(counts: np.ndarray, probs: np.ndarray, batch_size: int, seed: int, batch_index: int) -> np.ndarray:
    """Source index of each of the batch's rows, [batch_size]. `counts` (rows each source has had
    so far) is not modified."""
    counts = counts.astype(np.float64).copy()
    done = counts.sum()
    chosen = np.empty(batch_size, np.int64)
    for j in range(batch_size):
        k = int(np.argmax((done + j + 1) * probs - counts))
        chosen[j] = k
        counts[k] += 1
    return chosen[np.random.default_rng([seed, batch_index]).permutation(batch_size)]


def cursors_for(sources: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Row number, within its source's stream, of every row: source k's rows get start[k],
    start[k] + 1, ... in batch order."""
    cursors = np.empty(len(sources), np.int64)
    for k in np.unique(sources):
        sel = sources == k
        cursors[sel] = start[k] + np.arange(sel.sum())
    return cursors
