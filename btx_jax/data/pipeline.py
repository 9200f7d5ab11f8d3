"""The training iterator: mixture of packed sources -> per-process batches, with resumable state.

CONFIG SCHEMA (`ml_collections.ConfigDict` or dict; every key but `sources` is optional):

  kind           "pretrain" (default) | "sft"
  sources        list of source dicts (see btx_jax.data.sources): name, path, format, text_field /
                 template, ratio, eval_path, filters; SFT: instruction/input/output or messages
  add_bos        True: each document / example starts with BOS
  add_eos        True: each pretraining document ends with EOS (SFT responses always end with EOS)
  segment_ids    True: packed documents get their own segment ids/positions and never attend to
                 each other; False: one segment per row and loss everywhere (trl
                 ConstantLengthDataset exactly). Pretraining only; SFT always uses segments.
  shuffle        True: document order (pretrain) / packing order and row order (SFT) drawn from seed
  overlong       "truncate" (default) | "drop": SFT examples longer than seq_len + 1 tokens
  chat_template  "auto" (default: the tokenizer's template if it has one) | "default"
  cache_dir      None: optional folder for .npz token caches shared across runs

Each `next(pipeline)` returns this process's rows (global_batch_size // process_count) of the
global batch, as the dict of numpy arrays described in btx_jax.data.packing. The state is global
(the same on every process): restoring it with another process count continues the same global
batch stream.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np

from btx_jax.data.errors import DataError
from btx_jax.data.mixture import allocate_batch, cursors_for, normalize_ratios
from btx_jax.data.packing import FIELDS, PackedExamples, PackedStream, empty_rows
from btx_jax.data.sft import tokenize_sft
from btx_jax.data.sources import Source, tokenize_texts

_DEFAULTS = {
    "kind": "pretrain",
    "sources": None,
    "add_bos": True,
    "add_eos": True,
    "segment_ids": True,
    "shuffle": True,
    "overlong": "truncate",
    "chat_template": "auto",
    "cache_dir": None,
}
_STATE_VERSION = 1


def parse_config(cfg: Any) -> dict:
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = set(cfg) - set(_DEFAULTS)
    if unknown:
        raise DataError(f"data config: unknown keys {sorted(unknown)}")
    cfg = {**_DEFAULTS, **cfg}
    if cfg["kind"] not in ("pretrain", "sft"):
        raise DataError(f"data config: kind must be 'pretrain' or 'sft', not {cfg['kind']!r}")
    if not cfg["sources"]:
        raise DataError("data config: 'sources' is empty")
    cfg["sources"] = [Source.from_dict(s) for s in cfg["sources"]]
    names = [s.name for s in cfg["sources"]]
    if len(set(names)) != len(names):
        raise DataError(f"data config: source names must be unique, got {names}")
    return cfg


def build_store(cfg: dict, source: Source, tokenizer, *, seq_len: int, seed: int, training: bool):
    """The packed rows of one source: PackedStream (pretrain) or PackedExamples (SFT)."""
    if cfg["kind"] == "pretrain":
        docs = tokenize_texts(
            source, tokenizer, add_bos=cfg["add_bos"], add_eos=cfg["add_eos"], cache_dir=cfg["cache_dir"]
        )
        store = PackedStream(
            docs,
            name=source.name,
            seq_len=seq_len,
            seed=seed,
            shuffle=cfg["shuffle"] and training,
            segments=cfg["segment_ids"],
            pad_id=tokenizer.pad_id,
            wrap=training,
        )
        store.counts = {**docs.counts, "truncated": 0, "dropped": 0}
        return store
    docs = tokenize_sft(
        source, tokenizer, add_bos=cfg["add_bos"], chat_template=cfg["chat_template"], cache_dir=cfg["cache_dir"]
    )
    store = PackedExamples(
        docs,
        name=source.name,
        seq_len=seq_len,
        seed=seed,
        shuffle=cfg["shuffle"] and training,
        pad_id=tokenizer.pad_id,
        overlong=cfg["overlong"],
    )
    store.counts = {**docs.counts, **store.counts}
    return store


class Pipeline:
    """Iterator of batches; see the module docstring. Build it with `make_pipeline`."""

    def __init__(
        self,
        kind: str,
        names: list[str],
        probs: np.ndarray,
        stores: list,
        *,
        seq_len: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        seed: int,
        pad_id: int,
    ):
        self.kind, self.names, self.probs = kind, names, probs
        self.stores = stores
        self.seq_len, self.global_batch_size, self.seed, self.pad_id = seq_len, global_batch_size, seed, pad_id
        self.local_batch_size = global_batch_size // process_count
        self._lo = process_index * self.local_batch_size
        self._batch_index = 0
        self._rows = np.zeros(len(stores), np.int64)  # global rows taken from each source so far
        self._non_pad = 0  # global non-padding input positions so far

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        sources = allocate_batch(self._rows, self.probs, self.global_batch_size, self.seed, self._batch_index)
        cursors = cursors_for(sources, self._rows)
        hi = self._lo + self.local_batch_size
        local_src, local_cur = sources[self._lo : hi], cursors[self._lo : hi]
        batch = empty_rows(self.local_batch_size, self.seq_len, self.pad_id)
        for k in np.unique(local_src):
            sel = local_src == k
            rows = self.stores[k].rows(local_cur[sel])
            for f in FIELDS:
                batch[f][sel] = rows[f]
        for k in np.unique(sources):
            self._non_pad += self.stores[k].non_pad(cursors[sources == k])
        self._rows += np.bincount(sources, minlength=len(self.stores))
        self._batch_index += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (identical on every process)."""
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "batch_index": self._batch_index,
            "rows": {n: int(r) for n, r in zip(self.names, self._rows)},
            "non_pad_tokens": int(self._non_pad),
        }

    def set_state(self, state: dict) -> None:
        expected = {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"data state: {key}={state.get(key)!r} does not match this pipeline's {value!r}")
        if sorted(state["rows"]) != sorted(self.names):
            raise DataError(f"data state: sources {sorted(state['rows'])} do not match {sorted(self.names)}")
        self._batch_index = int(state["batch_index"])
        self._rows = np.array([state["rows"][n] for n in self.names], np.int64)
        self._non_pad = int(state["non_pad_tokens"])

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


def make_pipeline(
    cfg: Any,
    tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
) -> Pipeline:
    """A `Pipeline` over the config's sources (schema in the module docstring)."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count})")
    cfg = parse_config(cfg)
    names = [s.name for s in cfg["sources"]]
    probs = normalize_ratios(names, [s.ratio for s in cfg["sources"]])  # fail before tokenising
    stores = [build_store(cfg, s, tokenizer, seq_len=seq_len, seed=seed, training=True) for s in cfg["sources"]]
    return Pipeline(
        cfg["kind"],
        names,
        probs,
        stores,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        pad_id=tokenizer.pad_id,
    )


def eval_batches(
    cfg_or_source: Any,
    tokenizer,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    kind: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic held-out batches (no shuffling), each source's `eval_path` (else `path`) in file
    order, packed with segment ids; the last batch is padded with empty rows (loss_mask 0).

    `cfg_or_source` is a pipeline config (all its sources, one after another) or one source dict
    (one domain, for per-domain perplexity; `kind` says pretrain/sft, default pretrain)."""
    raw = dict(cfg_or_source.to_dict() if hasattr(cfg_or_source, "to_dict") else cfg_or_source)
    cfg = parse_config(raw if "sources" in raw else {"kind": kind or "pretrain", "sources": [raw]})
    stores = [
        build_store(cfg, s.held_out(), tokenizer, seq_len=seq_len, seed=0, training=False) for s in cfg["sources"]
    ]
    plan = [(store, row) for store in stores for row in range(int(store.rows_per_epoch))]
    n_batches = -(-len(plan) // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        batch = empty_rows(batch_size, seq_len, tokenizer.pad_id)
        chunk = plan[b * batch_size : (b + 1) * batch_size]
        for store in dict.fromkeys(s for s, _ in chunk):
            idx = [i for i, (s, _) in enumerate(chunk) if s is store]
            rows = store.rows(np.array([chunk[i][1] for i in idx]))
            for f in FIELDS:
                batch[f][idx] = rows[f]
        yield batch


def measure_throughput(pipeline: Pipeline, num_batches: int = 50, warmup: int = 2) -> dict[str, float]:
    """Tokens/s of `next(pipeline)` (after `warmup` batches); tokens = rows * seq_len of this process.
    The pipeline advances by warmup + num_batches batches."""
    for _ in range(warmup):
        next(pipeline)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(pipeline)
    seconds = time.perf_counter() - start
    tokens = num_batches * pipeline.local_batch_size * pipeline.seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "batches_per_s": num_batches / seconds,
        "seconds": seconds,
        "tokens": float(tokens),
    }
