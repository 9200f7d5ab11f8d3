"""Streaming sources (`"streaming": True` in a source spec): read and tokenised while training, no store.

A streaming source is opened with `datasets.load_dataset(..., streaming=True)`, an `IterableDataset` over a hub
dataset, a local directory laid out like one, or local files (nothing is downloaded or prepared ahead), and
split between processes with `datasets.distributed.split_dataset_by_node`: whole files per process when the
number of files is a multiple of the process count, else every process_count-th record. The processes read
disjoint records whose union is the source. Each process then, for its part:

  reads      blocks of BLOCK_RECORDS records (`IterableDataset.iter(batch_size=BLOCK_RECORDS)`)
  tokenises  each block with the store's `Encoder` (the same formatting, filters, BOS/EOS, SFT templates and
             response mask as a stored source)
  shuffles   (shuffle=True) the documents of each block in an order drawn from (seed, source, epoch, block),
             and the file order of each epoch (`IterableDataset.set_epoch`, a value drawn from (seed, source,
             epoch)): a bounded, local shuffle, not the stored path's permutation of the whole epoch
  packs      each block with the stored path's own packers, `PackedStream` (pretrain: documents back to back in
             rows of seq_len + 1 tokens, segment ids and positions per document, no loss across documents;
             segment_ids=False: one segment per row) and `PackedExamples` (SFT: next-fit packing of whole
             examples, truncate/drop). What does not fill a whole row is carried into the next block (pretrain:
             the last, under seq_len + 1 tokens; SFT: the examples of the row still open), so the rows are
             exactly the stored path's rows over the same documents in the same order: with shuffle=False and
             one process a streaming source gives the same batches as the same source stored
  repeats    at the end of its records: epoch e + 1 continues the stream (the carried tokens go on; SFT closes
             its open row, as the stored path starts every epoch on a new row)

Memory: one block of records and its tokens, plus under one row carried over, whatever the corpus size.

Mixtures: the rows of every global batch are given to sources as for stored sources (`BatchBuilder`: ratios are
shares of rows, i.e. of tokens, exact proportions), so streaming sources mix with each other and with stored
ones; a streaming source gives this process its next rows, in order. Stats (`StreamingPipeline.stats`): rows
and ratios are global as usual; a streaming source's documents/filtered/truncated/dropped are those this process
has read so far, its epochs the passes it has finished over its part, packing efficiency that of this process.

State (`StreamingPipeline.get_state`, JSON): the global batch index and, for each streaming source, its position
at the start of its current block (epoch, block number, the IterableDataset's `state_dict()`, the tokens carried
into the block: under one row, the counters) and the rows already taken from that block; resuming re-reads and
re-tokenises that one block, so the batch stream continues exactly. Positions differ per process: `get_state()`
holds every process's (gathered with JAX across the processes of a multi-process JAX runtime, else this
process's only) and `set_state()` takes its own. A state saved with another process count is refused (the split
of the records between processes would change), and so is `workers` > 0 (batches are built in order by one
read-ahead thread).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from btx_jax.data.errors import DataError
from btx_jax.data.packing import FIELDS, PackedExamples, PackedStream, source_rng
from btx_jax.data.loader import Pipeline
from btx_jax.data.sources import Source, load_records, read_error
from btx_jax.data.store import Encoder, TokenizedDocs, check_fields, encoding_options

BLOCK_RECORDS = 1000  # records read, tokenised and (shuffle=True) permuted together


@dataclasses.dataclass
class _Block:
    packed: PackedStream | PackedExamples | None  # the block's packed rows, numbered 0, 1, ...
    rows: int  # whole rows it gives (the rest is carried into the next block)
    after: dict  # the position of the next block


class StreamingRows:
    """A streaming source's packed rows for this process, given in order (see the module docstring). `rows(c)`
    returns the next len(c) rows whatever the row numbers c; the pipeline asks for them batch after batch."""

    def __init__(self, cfg: dict, source: Source, tokenizer, *, seq_len: int, seed: int, process_index: int,
                 process_count: int):
        self.name, self.source, self.kind, self.seq_len, self.seed = source.name, source, cfg["kind"], seq_len, seed
        self.shuffle, self.segments, self.overlong = cfg["shuffle"], cfg["segment_ids"], cfg["overlong"]
        self.pad_id = tokenizer.pad_id
        self.process_index, self.process_count = process_index, process_count
        self.options = encoding_options(cfg, tokenizer)
        self.encoder = Encoder(source, tokenizer, self.options, num_threads=-1)
        self._dataset = load_records(source, streaming=True)
        empty = {"tokens": [], "lengths": []} | ({"mask": [], "first": []} if self.kind == "sft" else {})
        counts = {"documents": 0, "filtered": 0, "truncated": 0, "dropped": 0}
        self._pos = {"epoch": 0, "block": 0, "dataset": None, "carry": empty, "taken": 0, "read": 0, "docs": 0,
                     "kept": 0, "counts": counts | ({"examples": 0} if self.kind == "sft" else {})}
        self._block, self._live, self._records = None, None, None
        self.consumed = self.position()  # where the batches the trainer has taken end (stats, state)
        self._current()  # read the first block now: bad input fails when the pipeline is made

    # -- position -------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """The JSON position after the rows given so far (a copy); "seen" counts through the current block."""
        pos = copy.deepcopy(self._pos)
        pos["seen"] = copy.deepcopy(self._block.after["counts"]) if self._block and pos["taken"] else pos["counts"]
        return pos

    def set_position(self, pos: dict) -> None:
        self._pos = copy.deepcopy({k: v for k, v in pos.items() if k != "seen"})
        self._block, self._live, self._records = None, None, None
        self.consumed = copy.deepcopy(pos)

    @property
    def counts(self) -> dict:
        return self.consumed["seen"]

    def epochs_done(self, rows: int) -> float:
        return float(self.consumed["epoch"])  # the length of the stream is not known: finished passes

    # -- rows -----------------------------------------------------------------------------------------------
    def rows(self, cursors: np.ndarray) -> dict[str, np.ndarray]:
        need, parts = len(cursors), []
        while need:
            block = self._current()
            start = self._pos["taken"]
            take = min(need, block.rows - start)
            parts.append(block.packed.rows(np.arange(start, start + take)))
            self._pos["taken"] += take
            need -= take
            if self._pos["taken"] == block.rows:
                self._pos, self._block = block.after, None
        return {f: np.concatenate([p[f] for p in parts]) for f in FIELDS}

    def _current(self) -> _Block:
        """The block at the current position, read, tokenised and packed on first use."""
        while self._block is None:
            batch = self._read()
            self._block = self._end_of_epoch() if batch is None else self._pack_records(batch)
            if self._block.rows == 0:  # nothing whole to give (carried on): the next position
                self._pos, self._block = self._block.after, None
        return self._block

    def _read(self) -> dict | None:
        """The next block of records of this process's part, or None at the end of the epoch."""
        pos = self._pos
        if self.source.max_docs is not None and pos["docs"] >= self.source.max_docs:
            return None
        if self._records is None:  # a fresh IterableDataset of this process's part (its own epoch and state)
            from datasets.distributed import split_dataset_by_node

            self._live = split_dataset_by_node(self._dataset, rank=self.process_index, world_size=self.process_count)
            if self.shuffle:  # the epoch's file order, the same on every process
                self._live.set_epoch(int(source_rng(self.seed, self.name, pos["epoch"]).integers(1, 1 << 31)))
            if pos["dataset"] is not None:
                self._live.load_state_dict(pos["dataset"])
            self._records = self._live.iter(batch_size=BLOCK_RECORDS)
        try:
            return next(self._records)
        except StopIteration:
            return None
        except Exception as e:  # datasets raises many types for a bad file (json, arrow, unicode, OS errors)
            raise read_error(self.source, e) from None

    def _end_of_epoch(self) -> _Block:
        pos, where = self._pos, f" (process {self.process_index} of {self.process_count})"
        paths = ", ".join(self.source.path)
        if pos["read"] == 0:
            raise DataError(f"source {self.name!r}: no records in {paths}"
                            f"{where + ': fewer records than processes' if self.process_count > 1 else ''}")
        if pos["kept"] == 0 and self.kind == "pretrain":
            raise DataError(f"source {self.name!r}: no documents left after filtering {paths} "
                            f"(min_chars={self.source.min_chars}, max_chars={self.source.max_chars})")
        if pos["kept"] == 0:
            raise DataError(f"source {self.name!r}: every example was dropped (too long for seq_len={self.seq_len} "
                            "or no response tokens)")
        self._records = None
        after = {**copy.deepcopy(pos), "epoch": pos["epoch"] + 1, "block": 0, "dataset": None, "taken": 0,
                 "read": 0, "docs": 0, "kept": 0}
        if self.kind == "pretrain" or not pos["carry"]["lengths"]:
            return _Block(None, 0, after)  # pretraining: the carried tokens go on into the next epoch
        packed, rows, after["carry"] = self._pack(pos["carry"], [], final=True)  # SFT: close the open row
        return _Block(packed, rows, after)

    def _pack_records(self, batch: dict[str, list]) -> _Block:
        """Tokenise a block of records (cut at max_docs, shuffled) and pack it after the carried tokens."""
        pos = self._pos
        check_fields(self.source, list(batch), self.options)
        read = len(next(iter(batch.values())))
        encoded, _ = self.encoder(batch, first_row=pos["read"])
        n = len(encoded["input_ids"])
        if self.source.max_docs is not None:
            n = min(n, self.source.max_docs - pos["docs"])
        order = range(n)
        if self.shuffle:
            order = source_rng(self.seed, self.name, pos["epoch"], pos["block"]).permutation(n)
        docs = [{k: v[i] for k, v in encoded.items()} for i in order]
        packed, rows, carry = self._pack(pos["carry"], docs, final=False)
        counts = dict(pos["counts"], documents=pos["counts"]["documents"] + n)
        if self.kind == "pretrain":
            counts["filtered"] += read - n
            kept = n
        else:  # the carried examples were counted (kept, maybe truncated) in the block they came from
            kept = packed.counts["examples"] - len(pos["carry"]["lengths"])
            for key in ("truncated", "dropped"):
                counts[key] += packed.counts[key]
            counts["examples"] += kept
        after = {**pos, "block": pos["block"] + 1, "dataset": self._live.state_dict(), "carry": carry, "taken": 0,
                 "read": pos["read"] + read, "docs": pos["docs"] + n, "kept": pos["kept"] + kept, "counts": counts}
        return _Block(packed, rows, after)

    def _pack(self, carry: dict, docs: list[dict], *, final: bool):
        """(packed rows, whole rows to give, carry) of the carried tokens followed by `docs`."""
        lengths = np.array(carry["lengths"] + [len(d["input_ids"]) for d in docs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.concatenate([np.asarray(carry["tokens"], np.int32)]
                                + [np.asarray(d["input_ids"], np.int32) for d in docs])
        if self.kind == "pretrain":
            return self._pack_stream(tokens, offsets)
        mask = np.concatenate([np.asarray(carry["mask"], np.uint8)]
                              + [np.asarray(d["response_mask"], np.uint8) for d in docs])
        first = np.array(carry["first"] + [d["first_response"] for d in docs], np.int64)
        packed = PackedExamples(TokenizedDocs(tokens, offsets, mask, first, {}), name=self.name,
                                seq_len=self.seq_len, seed=self.seed, shuffle=False, pad_id=self.pad_id,
                                overlong=self.overlong, allow_empty=True)
        rows = packed.rows_per_epoch
        if final or rows == 0:
            return packed, rows, {"tokens": [], "lengths": [], "mask": [], "first": []}
        starts, kept = packed.row_spans(rows - 1)  # the open row's examples go on into the next block
        take = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, kept)])
        carry = {"tokens": tokens[take].tolist(), "lengths": kept.tolist(), "mask": mask[take].tolist(),
                 "first": first[np.searchsorted(offsets, starts)].tolist()}
        return packed, rows - 1, carry

    def _pack_stream(self, tokens: np.ndarray, offsets: np.ndarray):
        row = self.seq_len + 1
        total = int(offsets[-1])
        rows, cut = total // row, total // row * row
        piece = int(np.searchsorted(offsets, cut, side="right")) - 1  # the document holding token `cut`
        rest = [] if cut == total else [int(offsets[piece + 1]) - cut] + np.diff(offsets[piece + 1 :]).tolist()
        packed = None
        if rows:
            packed = PackedStream(TokenizedDocs(tokens, offsets, None, None, {}), name=self.name,
                                  seq_len=self.seq_len, seed=self.seed, shuffle=False, segments=self.segments,
                                  pad_id=self.pad_id, wrap=False)
        return packed, rows, {"tokens": tokens[cut:].tolist(), "lengths": rest}


class _ReadAhead:
    """Batches start, start + 1, ... built in order by one thread, `depth` ahead (0: built on demand)."""

    def __init__(self, build, start: int, depth: int):
        self._build, self._next, self._depth = build, start, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="btx-streaming") if depth else None
        self._pending = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self._depth:
            self._pending.append(self._pool.submit(self._build, self._next))
            self._next += 1

    def __next__(self) -> dict:
        if self._pool is None:
            self._next += 1
            return self._build(self._next - 1)
        future = self._pending.popleft()
        self._fill()
        return future.result()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


class StreamingPipeline(Pipeline):
    """A pipeline with streaming sources (module docstring): batches built in order, state per process."""

    streams = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._streaming = {n: s for n, s in zip(self.names, self.stores) if isinstance(s, StreamingRows)}
        first = next(iter(self._streaming.values()))
        self.process_index, self.process_count = first.process_index, first.process_count

    def _build(self, batch_index: int) -> dict:
        sources, cursors = self.builder.global_rows(batch_index)
        batch = self.builder.local_batch(sources, cursors)
        batch["_rows"] = np.bincount(sources, minlength=len(self.stores))
        batch["_non_pad"] = np.int64((batch["segment_ids"] > 0).sum())  # this process's rows only
        batch["_positions"] = {n: s.position() for n, s in self._streaming.items()}
        return batch

    def _iterator(self):
        if self._iter is None:
            self._iter = _ReadAhead(self._build, self._batch_index, self.read_ahead)
        return self._iter

    def __next__(self) -> dict[str, np.ndarray]:
        batch = super().__next__()
        for name, pos in batch.pop("_positions").items():
            self._streaming[name].consumed = pos
        return batch

    def get_state(self) -> dict:
        """JSON position: global batch index and row counts, and every process's streaming positions."""
        own = {n: s.consumed for n, s in self._streaming.items()}
        return {
            **self._fixed(),
            "batch_index": self._batch_index,
            "rows": {n: int(r) for n, r in zip(self.names, self._rows)},
            "non_pad_tokens": int(self._non_pad),
            "stores": self.store_names,
            "streaming": {"process_count": self.process_count,
                          "positions": _gather(self.process_index, self.process_count, own)},
        }

    def set_state(self, state: dict) -> None:
        self._check_state(state)
        saved = state["streaming"]
        if saved["process_count"] != self.process_count:
            raise DataError(
                f"data state: saved with process_count={saved['process_count']}, this run has {self.process_count}; "
                f"streaming sources {sorted(self._streaming)} are split between processes, so a resumed run "
                "needs the same process count"
            )
        own = saved["positions"].get(str(self.process_index))
        if own is None:
            raise DataError(
                f"data state: holds the streaming positions of processes {sorted(saved['positions'], key=int)} only, "
                f"not of process {self.process_index}; save get_state() with every process's positions"
            )
        if sorted(own) != sorted(self._streaming):
            raise DataError(f"data state: streaming sources {sorted(own)} do not match {sorted(self._streaming)}")
        if self._iter is not None:
            self._iter.close()
        self._iter = None
        self._batch_index = int(state["batch_index"])
        self._rows = np.array([state["rows"][n] for n in self.names], np.int64)
        self._non_pad = int(state["non_pad_tokens"])
        for name, pos in own.items():
            self._streaming[name].set_position(pos)

    def stats(self) -> dict:
        out = super().stats()
        local_rows = self._batch_index * self.local_batch_size
        out["packing_efficiency"] = self._non_pad / (local_rows * self.seq_len) if local_rows else 0.0
        return out


def _gather(process_index: int, process_count: int, own: dict) -> dict[str, dict]:
    """{process index (str): positions} of every process when this runs in a multi-process JAX runtime of
    `process_count` processes (every process must call get_state, as the trainer does), else of this one."""
    jax = sys.modules.get("jax")
    if process_count == 1 or jax is None or jax.process_count() != process_count:
        return {str(process_index): own}
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps({"process": process_index, "positions": own}).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out = {}
    for size, row in zip(sizes, every):
        entry = json.loads(bytes(row[: int(size)]).decode())
        out[str(entry["process"])] = entry["positions"]
    return out
