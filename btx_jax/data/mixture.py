"""Mixture ratios: validated and normalised to probabilities.

Ratios are shares of rows, i.e. of tokens (all rows have seq_len). Which source each global row comes
from is grain's exact-proportion interleave (`grain.MapDataset.mix`, see btx_jax.data.loader): after n
rows every source's count is within a row or two of ratio * n; the rows of each batch are then put in an
order drawn from (seed, batch index), so the result depends only on the seed and is the same on every
process.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from btx_jax.data.errors import DataError


def normalize_ratios(names: Sequence[str], ratios: Sequence[float]) -> np.ndarray:
    """Ratios as probabilities; DataError when one is not a number (True is not one), negative or non-finite,
    when all are zero, or when their sum overflows."""
    for name, r in zip(names, ratios):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
            raise DataError(f"source {name!r}: ratio must be a finite number >= 0, got {r!r}")
    try:
        total = math.fsum(ratios)
    except OverflowError:
        total = math.inf
    if total <= 0:
        raise DataError(f"mixture ratios are all zero (sources: {', '.join(names)})")
    if not math.isfinite(total):
        raise DataError(f"mixture ratios sum to infinity (sources: {', '.join(names)}); they are "
                        "relative weights: use smaller numbers such as 1 and 3")
    return np.asarray(ratios, np.float64) / total
