"""Grain loading: packed sources -> mixture -> this process's rows of every global batch, read ahead.

The global batch stream is a pure function of (stores, seed, ratios, global batch size):
  rows      each source's packed rows (PackedStream / PackedExamples) are random access by row number
  mixture   `grain.MapDataset.mix` interleaves the sources' row numbers with the configured weights (exact
            proportions, closed form: global row r -> (source, row number within it)); zero-weight sources
            are left out of the mix and never sampled
  batches   global batch b holds global rows b*B ... b*B + B-1: their sources are put in an order drawn from
            (seed, b), so every process sees every source, and each source's rows follow in batch order
            (one source: consecutive rows); process p builds only positions [p*B/P, (p+1)*B/P) of it
The loader is `grain.MapDataset.range(...).map(batch)` turned into an iterator with `read_ahead` batches
prefetched by a thread (`grain.ReadOptions`) and, with `workers` > 0, built in that many worker processes
(`mp_prefetch`; workers reopen the stores, nothing is copied). Its state is grain's
iterator state (JSON) plus the global batch index; since batches are indexed globally, a run restored with
another process count or worker count continues the same global stream from that index.
"""

from __future__ import annotations

import numpy as np

from btx_jax.data.packing import FIELDS, empty_rows

_ENDLESS = 1 << 62


class _Tag:
    """row -> (source k, row): the mixture's elements are row numbers tagged with their source."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, row: int) -> tuple[int, int]:
        return self.k, row


class BatchBuilder:
    """Global batch index -> this process's rows (+ the global per-source row counts and non-padding
    tokens, under the keys `_rows` and `_non_pad`, for the pipeline's stats)."""

    def __init__(self, stores: list, probs: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int, process_count: int, pad_id: int):
        import grain

        self.stores, self.seq_len, self.seed, self.pad_id = stores, seq_len, seed, pad_id
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self._lo = process_index * self.local_batch_size
        used = [k for k, p in enumerate(probs) if p > 0]
        self._mixed = grain.MapDataset.mix(
            [grain.MapDataset.range(_ENDLESS).map(_Tag(k)) for k in used],
            [float(probs[k]) for k in used],
        )

    def global_rows(self, batch_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row number within the source) of each row of the global batch, in batch order."""
        start = batch_index * self.global_batch_size
        pairs = np.array([self._mixed[start + j] for j in range(self.global_batch_size)], np.int64)
        sources = pairs[np.random.default_rng([self.seed, batch_index]).permutation(self.global_batch_size), 0]
        cursors = np.empty_like(sources)
        for k in np.unique(sources):  # each source's rows keep their order, in batch order
            cursors[sources == k] = pairs[pairs[:, 0] == k, 1]
        return sources, cursors

    def local_batch(self, sources: np.ndarray, cursors: np.ndarray) -> dict[str, np.ndarray]:
        """This process's slice of the global batch with these (source, row number) rows; each source is asked
        for its rows once, in batch order."""
        hi = self._lo + self.local_batch_size
        local_src, local_cur = sources[self._lo : hi], cursors[self._lo : hi]
        batch = empty_rows(self.local_batch_size, self.seq_len, self.pad_id)
        for k in np.unique(local_src):
            sel = local_src == k
            rows = self.stores[k].rows(local_cur[sel])
            for f in FIELDS:
                batch[f][sel] = rows[f]
        return batch

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        sources, cursors = self.global_rows(batch_index)
        batch = self.local_batch(sources, cursors)
        batch["_rows"] = np.bincount(sources, minlength=len(self.stores))
        batch["_non_pad"] = np.int64(sum(self.stores[k].non_pad(cursors[sources == k]) for k in np.unique(sources)))
        return batch


def batch_iterator(builder: BatchBuilder, start: int, *, workers: int, read_ahead: int):
    """Grain iterator over the global batches start, start + 1, ... (see module docstring)."""
    import grain

    dataset = grain.MapDataset.range(start, _ENDLESS).map(builder)
    read = grain.ReadOptions(num_threads=1 if read_ahead else 0, prefetch_buffer_size=read_ahead)
    dataset = dataset.to_iter_dataset(read)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker start reads absl flags: outside an absl app, defaults
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(dataset)
