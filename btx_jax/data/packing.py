"""Packing tokenised documents into fixed-length rows, as numpy arrays [rows, seq_len].

Every row dict has the batch interface: `inputs` int32, `targets` int32, `loss_mask` float32,
`segment_ids` int32 (1, 2, ... per document within the row, 0 = padding), `positions` int32
(position within the document piece, restarting at 0 at each document).

`PackedStream` (pretraining) is trl's ConstantLengthDataset method: documents ([BOS] text EOS)
are concatenated, with no padding, and cut into consecutive rows of seq_len + 1 tokens;
inputs = row[:-1], targets = row[1:]. Every token appears exactly once, in order; a document
longer than a row is split across rows. The stream is infinite: epoch e lists the documents in
the order of a permutation drawn from (seed, source, e) (file order when shuffle is off) and
continues straight into epoch e + 1, so no token is ever dropped.
  segments on:  document pieces in a row get segment ids 1, 2, ...; positions restart at 0 at each
                document and at the row start (a document continued from the previous row is a
                new piece); loss_mask = 0 where the target is the first token of the next document
                (the EOS of a document is its own last token, so "text -> EOS" is still learned).
  segments off: one segment per row (all ones), positions 0..seq_len-1, loss_mask = 1 everywhere:
                exactly the trl/seed behaviour where documents in a row attend to each other.
With `wrap=False` (evaluation) the stream is one epoch in file order and the last row is padded.

`PackedExamples` (SFT) packs whole examples, each shifted on its own (an example of n tokens
gives n - 1 input/target pairs), greedily in order into rows of seq_len pairs (next-fit: an
example that does not fit the current row opens the next one), then pads. An example longer than
a row is truncated (its first seq_len + 1 tokens) or dropped, per `overlong`; one left with no
response token is dropped; both are counted. The layout (row and offset of every example) is
planned once from the example lengths (example order drawn from the seed); rows are filled from
the store only when asked for; each epoch visits the rows in a new seeded order.

Both classes are random access (row number -> row), pure functions of (store, seed, options), so
any process or loader worker can build any row; only the document/row orders of the epochs in use
are kept in memory (int32 per document or row, int64 for token positions).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from btx_jax.data.errors import DataError
from btx_jax.data.store import TokenizedDocs

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_CHUNK = 1 << 18  # documents per step when an epoch's document starts are summed


def source_rng(seed: int, name: str, *salt: int) -> np.random.Generator:
    """A generator fixed by (seed, source name, salt): adding a source never changes another's."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *salt])


def _order(n: int, shuffle: bool, seed: int, name: str, *salt: int) -> np.ndarray:
    """0 .. n-1 (int32: documents and examples number under 2^31), shuffled in place by (seed, name, salt) if
    shuffle: the same order as `permutation(n)`, without its int64 array and copy."""
    order = np.arange(n, dtype=np.int32)
    if shuffle:
        source_rng(seed, name, *salt).shuffle(order)
    return order


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "inputs": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }


class PackedStream:
    """Constant-length rows of a document stream (see module docstring)."""

    def __init__(
        self,
        docs: TokenizedDocs,
        *,
        name: str,
        seq_len: int,
        seed: int,
        shuffle: bool,
        segments: bool,
        pad_id: int,
        wrap: bool = True,
    ):
        self.docs, self.name, self.seq_len, self.seed = docs, name, seq_len, seed
        self.shuffle, self.segments, self.pad_id, self.wrap = shuffle, segments, pad_id, wrap
        self.tokens_per_epoch = int(docs.offsets[-1])
        if self.tokens_per_epoch == 0:
            raise DataError(f"source {name!r}: no tokens")
        row = seq_len + 1
        self.rows_per_epoch = self.tokens_per_epoch / row if wrap else -(-self.tokens_per_epoch // row)

    @functools.lru_cache(maxsize=2)  # a batch's rows are in one epoch, or two at an epoch's end
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, int32; start of each document in the epoch's stream + total, int64), built in
        chunks so that the temporaries stay small."""
        offsets = self.docs.offsets
        order = _order(len(offsets) - 1, self.shuffle, self.seed, self.name, epoch)
        starts = np.zeros(len(order) + 1, np.int64)
        for lo in range(0, len(order), _CHUNK):
            doc = order[lo : lo + _CHUNK]
            piece = starts[lo + 1 : lo + 1 + len(doc)]
            np.cumsum(offsets[doc + 1] - offsets[doc], out=piece)
            piece += starts[lo]
        return order, starts

    def epochs_done(self, rows: int) -> float:
        return rows / self.rows_per_epoch

    def non_pad(self, cursors: np.ndarray) -> int:
        return len(cursors) * self.seq_len  # training rows are always full

    def rows(self, cursors: np.ndarray) -> dict[str, np.ndarray]:
        """Rows number `cursors` of the stream, [len(cursors), seq_len] each."""
        total, n_docs = self.tokens_per_epoch, len(self.docs.offsets) - 1
        row_start = np.asarray(cursors, np.int64)[:, None] * (self.seq_len + 1)
        pos = row_start + np.arange(self.seq_len + 1)  # stream positions [n, L+1]
        epoch, within = np.divmod(pos, total)
        tokens = np.full(pos.shape, self.pad_id, np.int32)
        doc_uid = np.full(pos.shape, -1, np.int64)  # unique per document per epoch
        doc_start = np.zeros(pos.shape, np.int64)  # stream position of its first token
        valid = np.ones(pos.shape, bool) if self.wrap else epoch == 0
        for e in np.unique(epoch[valid]):
            sel = valid & (epoch == e)
            order, starts = self._epoch(int(e))
            rank = np.searchsorted(starts, within[sel], side="right") - 1
            doc = order[rank]
            tokens[sel] = self.docs.tokens[self.docs.offsets[doc] + within[sel] - starts[rank]]
            doc_uid[sel] = e * n_docs + rank
            doc_start[sel] = e * total + starts[rank]
        out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        target_real = valid[:, 1:]
        if self.segments:
            seg = np.where(valid, doc_uid - doc_uid[:, :1] + 1, 0)
            same_doc = seg[:, 1:] == seg[:, :-1]
            out["loss_mask"] = (same_doc & target_real).astype(np.float32)
            out["segment_ids"] = seg[:, :-1].astype(np.int32)
            out["positions"] = np.where(valid, pos - np.maximum(doc_start, row_start), 0)[:, :-1].astype(np.int32)
        else:
            out["loss_mask"] = target_real.astype(np.float32)
            out["segment_ids"] = valid[:, :-1].astype(np.int32)
            out["positions"] = np.where(valid[:, :-1], np.arange(self.seq_len), 0).astype(np.int32)
        return out


class PackedExamples:
    """SFT examples packed whole into padded rows (see module docstring)."""

    def __init__(
        self, docs: TokenizedDocs, *, name: str, seq_len: int, seed: int, shuffle: bool, pad_id: int, overlong: str,
        allow_empty: bool = False,
    ):
        if overlong not in ("truncate", "drop"):
            raise DataError(f"overlong must be 'truncate' or 'drop', not {overlong!r}")
        self.name, self.seq_len, self.seed, self.shuffle = name, seq_len, seed, shuffle
        starts, lengths = docs.offsets[:-1], docs.lengths
        too_long = lengths - 1 > seq_len
        keep_len = np.minimum(lengths, seq_len + 1)
        # targets are tokens 1..keep_len-1 of each example: keep it if one of them is a response token
        keep = (docs.first_response < keep_len) & ~(too_long & (overlong == "drop"))
        self.counts = {
            "examples": int(keep.sum()),
            "truncated": int((too_long & keep).sum()),
            "dropped": int((~keep).sum()),
        }
        if not keep.any() and not allow_empty:  # allow_empty: a streamed block (btx_jax.data.streaming)
            raise DataError(
                f"source {name!r}: every example was dropped (too long for seq_len={seq_len} or no response tokens)"
            )
        order = _order(len(lengths), shuffle, seed, name)
        order = order[keep[order]]
        self.docs, self.pad_id = docs, pad_id
        self._starts, self._pairs = starts[order], keep_len[order] - 1
        self._row_of, self._offset, self._seg, self._fill = self._plan(self._pairs)
        self._first = np.searchsorted(self._row_of, np.arange(len(self._fill) + 1))  # first example of each row
        self.rows_per_epoch = len(self._fill)

    def _plan(self, pairs: np.ndarray):
        """Greedy in-order packing: each example goes to the current row if it fits, else a new one."""
        row_of, offset_in_row, seg_of = (np.empty(len(pairs), np.int32) for _ in range(3))
        row, used, seg = 0, 0, 0
        for i, n in enumerate(pairs.tolist()):
            if used + n > self.seq_len:
                row, used, seg = row + 1, 0, 0
            row_of[i], offset_in_row[i], seg_of[i] = row, used, seg + 1
            used, seg = used + n, seg + 1
        fill = np.bincount(row_of, weights=pairs, minlength=row + 1 if len(pairs) else 0).astype(np.int64)
        return row_of, offset_in_row, seg_of, fill

    def row_spans(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset in the store, kept tokens) of each example of layout row `row`, in packing order."""
        examples = slice(self._first[row], self._first[row + 1])
        return self._starts[examples], self._pairs[examples] + 1

    def _materialise(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `ids` of the layout, filled from the store."""
        rows = empty_rows(len(ids), self.seq_len, self.pad_id)
        per_row = self._first[ids + 1] - self._first[ids]
        example = np.repeat(self._first[ids] - np.cumsum(per_row) + per_row, per_row) + np.arange(per_row.sum())
        slot = np.repeat(np.arange(len(ids)), per_row)  # output row of each example
        pairs = self._pairs[example]
        k = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)  # pair index in its example
        src = np.repeat(self._starts[example], pairs) + k
        dest = np.repeat(slot * self.seq_len + self._offset[example], pairs) + k
        for field, values in (
            ("inputs", self.docs.tokens[src]),
            ("targets", self.docs.tokens[src + 1]),
            ("loss_mask", self.docs.response_mask[src + 1]),
            ("segment_ids", np.repeat(self._seg[example], pairs)),
            ("positions", k),
        ):
            rows[field].reshape(-1)[dest] = values
        return rows

    def _row_ids(self, cursors: np.ndarray) -> np.ndarray:
        epoch, index = np.divmod(np.asarray(cursors, np.int64), self.rows_per_epoch)
        if not self.shuffle:
            return index
        out = np.empty_like(index)
        for e in np.unique(epoch):
            out[epoch == e] = self._row_order(int(e))[index[epoch == e]]
        return out

    @functools.lru_cache(maxsize=2)
    def _row_order(self, epoch: int) -> np.ndarray:
        return _order(self.rows_per_epoch, True, self.seed, self.name, 1, epoch)

    def epochs_done(self, rows: int) -> float:
        return rows / self.rows_per_epoch

    def non_pad(self, cursors: np.ndarray) -> int:
        return int(self._fill[self._row_ids(cursors)].sum())

    def rows(self, cursors: np.ndarray) -> dict[str, np.ndarray]:
        return self._materialise(self._row_ids(cursors))
