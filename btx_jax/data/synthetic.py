"""Synthetic token batches with the training pipeline's interface (for engine tests and benchmarks)."""

from __future__ import annotations

import numpy as np


class SyntheticPipeline:
    """Deterministic random tokens: batch k of the global stream depends only on (seed, k)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
    ):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        rows = global_batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self.global_batch_size = global_batch_size
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        tokens = rng.integers(0, self.vocab_size, (self.global_batch_size, self.seq_len + 1), dtype=np.int32)
        self.index += 1
        t = tokens[self.rows]
        shape = t[:, :-1].shape
        return {
            "inputs": t[:, :-1],
            "targets": t[:, 1:],
            "loss_mask": np.ones(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
        }

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def stats(self) -> dict:
        return {"batches": self.index}
