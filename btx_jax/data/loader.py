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

from typing import Iterator

import numpy as np

from btx_jax.data.errors import DataError
from btx_jax.data.packing import FIELDS, empty_rows

_ENDLESS = 1 << 62
_STATE_VERSION = 2


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


class Pipeline:
    """Iterator of this process's batches with resumable state (the global batch index and grain's
    iterator state); see btx_jax.data.pipeline. Build it with `make_pipeline`."""

    streams = False  # True: some sources stream (btx_jax.data.streaming.StreamingPipeline)

    def __init__(self, kind: str, names: list[str], probs: np.ndarray, stores: list, builder: BatchBuilder, *,
                 workers: int, read_ahead: int, allow_changed_data: bool = False):
        self.kind, self.names, self.probs, self.stores = kind, names, probs, stores
        self.allow_changed_data = allow_changed_data
        # each source's store (its folder name holds the fingerprint of corpus, tokenizer and formatting);
        # None for a streaming source, which has no store
        self.store_names = {n: s.docs.reopen[0].name if getattr(getattr(s, "docs", None), "reopen", ()) else None
                            for n, s in zip(names, stores)}
        self.builder, self.workers, self.read_ahead = builder, workers, read_ahead
        self.seq_len, self.seed = builder.seq_len, builder.seed
        self.global_batch_size, self.local_batch_size = builder.global_batch_size, builder.local_batch_size
        self._batch_index = 0
        self._rows = np.zeros(len(stores), np.int64)  # global rows taken from each source so far
        self._non_pad = 0  # global non-padding input positions so far
        self._iter, self._start = None, 0  # the grain iterator over global batches _start, ...; made on first use

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _iterator(self):
        if self._iter is None:
            self._iter = batch_iterator(self.builder, self._start, workers=self.workers, read_ahead=self.read_ahead)
        return self._iter

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._iterator()))
        self._rows += batch.pop("_rows")
        self._non_pad += int(batch.pop("_non_pad"))
        self._batch_index += 1
        return batch

    def _fixed(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (identical on every process)."""
        return {
            **self._fixed(),
            "batch_index": self._batch_index,
            "rows": {n: int(r) for n, r in zip(self.names, self._rows)},
            "non_pad_tokens": int(self._non_pad),
            "stores": self.store_names,
            "workers": self.workers,
            "start": self._start,
            "grain": self._iterator().get_state(),
        }

    def _check_state(self, state: dict) -> None:
        for key, value in self._fixed().items():
            if state.get(key) != value:
                raise DataError(f"data state: {key}={state.get(key)!r} does not match this pipeline's {value!r}")
        if sorted(state["rows"]) != sorted(self.names):
            raise DataError(f"data state: sources {sorted(state['rows'])} do not match {sorted(self.names)}")
        if ("streaming" in state) != self.streams:
            saved, here = ("with", "has none") if "streaming" in state else ("without", "has some")
            raise DataError(f"data state: saved by a pipeline {saved} streaming sources, this one {here}")
        changed = [n for n, store in state.get("stores", {}).items() if store != self.store_names[n]]
        if changed and not self.allow_changed_data:  # a state saved before stores were recorded has no "stores"
            n = changed[0]
            raise DataError(f"data state: source {n!r} was trained on store {state['stores'][n]} and its data now "
                            f"makes store {self.store_names[n]} (the corpus, tokenizer or formatting changed); "
                            "restore the data, or set data.allow_changed_data=True to resume on the new data")

    def set_state(self, state: dict) -> None:
        self._check_state(state)
        self._batch_index = int(state["batch_index"])
        self._rows = np.array([state["rows"][n] for n in self.names], np.int64)
        self._non_pad = int(state["non_pad_tokens"])
        self._iter, self._start = None, 0
        if state.get("workers") == self.workers and state.get("start") == 0:
            self._iterator().set_state(state["grain"])  # grain's own state
        else:  # another worker layout: a fresh iterator from the global batch index
            self._start = self._batch_index

    def stats(self) -> dict:
        """Realised mixture, packing efficiency, epochs, and per-source document counts."""
        total = int(self._rows.sum())
        per = lambda key: {n: int(s.counts[key]) for n, s in zip(self.names, self.stores)}
        return {
            "kind": self.kind,
            "batches": self._batch_index,
            "rows": {n: int(r) for n, r in zip(self.names, self._rows)},
            "target_ratios": {n: float(p) for n, p in zip(self.names, self.probs)},
            "realised_ratios": {n: (float(r) / total if total else 0.0) for n, r in zip(self.names, self._rows)},
            "packing_efficiency": self._non_pad / (total * self.seq_len) if total else 0.0,
            "epochs": {n: s.epochs_done(int(r)) for n, s, r in zip(self.names, self.stores, self._rows)},
            "documents": per("documents"),
            "filtered": per("filtered"),
            "truncated": per("truncated"),
            "dropped": per("dropped"),
        }
