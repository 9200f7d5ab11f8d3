"""The training iterator: mixture of packed sources -> per-process batches, with resumable state.

CONFIG (`ml_collections.ConfigDict` or dict; every key but `sources` is optional; keys, types and defaults:
btx_jax/schema.py Data):

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
  cache_dir      where the tokenised stores go (btx_jax.data.store); None: $BTX_DATA_CACHE, else
                 ~/.cache/btx_jax/data. A shared filesystem path lets several hosts share one store.
  num_proc       processes tokenising a store (None: every core for a corpus of 64 MB or more, else one);
                 they are started with "spawn", so a script that builds stores needs an
                 `if __name__ == "__main__":` guard
  shard_mb       store build shard size in MB of records (resume granularity; default 64)
  verify         "sampled" (default): a store's files are checked against their checksums on a few
                 blocks when opened; "full": on every byte
  skip_bad_records  False (default): an SFT record without its prompt or response is refused (one line
                 naming its file and line); True: such records are skipped and counted
  allow_changed_data  False (default): resuming refuses a store that is not the one the checkpoint was
                 trained on (the corpus or its tokenisation changed); True: resume on the new data anyway
  workers        grain worker processes building batches (default 0: built by a read-ahead thread);
                 must be 0 with streaming sources
  read_ahead     batches prefetched ahead of the trainer (default 2; 0: built on demand)
  tokenizer      ignored here (the trainer and scripts/prepare_data.py load it)

Each `next(pipeline)` returns this process's rows (global_batch_size // process_count) of the
global batch, as the dict of numpy arrays described in btx_jax.data.packing. Sources are tokenised
once into stores on disk (btx_jax.data.store) and batches are built by grain
(btx_jax.data.loader). The state is global (the same on every process) and JSON: grain's iterator
state plus the global batch index, so restoring it with another process count continues the same
global batch stream.

Sources with `streaming=True` are read and tokenised while training (btx_jax.data.streaming): each process
reads its own part of them, so a pipeline with one is a `StreamingPipeline`, whose state is per process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from btx_jax import schema
from btx_jax.data.errors import DataError
from btx_jax.data.loader import BatchBuilder, Pipeline
from btx_jax.data.mixture import normalize_ratios
from btx_jax.data.packing import FIELDS, PackedExamples, PackedStream, empty_rows
from btx_jax.data.sources import Source
from btx_jax.data.store import dropped_records, encoding_options, open_store
from btx_jax.data.streaming import StreamingPipeline, StreamingRows
from btx_jax.data.tokenizer import load_tokenizer

_DEFAULTS = schema.defaults(schema.Data)     # btx_jax/schema.py Data (docs/reference/configuration.md)


def parse_config(cfg: Any) -> dict:
    cfg = dict(schema.plain(cfg))
    unknown = set(cfg) - set(_DEFAULTS)
    if unknown:
        raise DataError(f"data config: unknown keys {sorted(unknown)}")
    cfg = {**_DEFAULTS, **cfg}
    if cfg["kind"] not in ("pretrain", "sft"):
        raise DataError(f"data config: kind must be 'pretrain' or 'sft', not {cfg['kind']!r}")
    if not cfg["sources"]:
        raise DataError("data config: 'sources' is empty")
    if cfg["chat_template"] not in ("auto", "default"):
        raise DataError(f"chat_template must be 'auto' or 'default', not {cfg['chat_template']!r}")
    cfg["sources"] = [Source.from_dict(s) for s in cfg["sources"]]
    names = [s.name for s in cfg["sources"]]
    if len(set(names)) != len(names):
        raise DataError(f"data config: source names must be unique, got {names}")
    return cfg


def source_docs(cfg: dict, source: Source, tokenizer, progress: bool = True):
    """The source's tokenised documents from its store (built on first use)."""
    return open_store(source, tokenizer, encoding_options(cfg, tokenizer), cache_dir=cfg["cache_dir"],
                      num_proc=cfg["num_proc"], shard_mb=cfg["shard_mb"], progress=progress, verify=cfg["verify"])


def packed_rows(cfg: dict, source: Source, tokenizer, *, seq_len: int, seed: int, training: bool):
    """The packed rows of one source: PackedStream (pretrain) or PackedExamples (SFT)."""
    docs = source_docs(cfg, source, tokenizer)
    if cfg["kind"] == "pretrain":
        rows = PackedStream(
            docs,
            name=source.name,
            seq_len=seq_len,
            seed=seed,
            shuffle=cfg["shuffle"] and training,
            segments=cfg["segment_ids"],
            pad_id=tokenizer.pad_id,
            wrap=training,
        )
        rows.counts = {**docs.counts, "truncated": 0, "dropped": 0}
        return rows
    rows = PackedExamples(
        docs,
        name=source.name,
        seq_len=seq_len,
        seed=seed,
        shuffle=cfg["shuffle"] and training,
        pad_id=tokenizer.pad_id,
        overlong=cfg["overlong"],
    )
    rows.counts = {**docs.counts, **rows.counts}
    return rows


def prepare(cfg: Any, tokenizer, *, held_out: bool = True, progress: bool = True) -> list[tuple[str, dict]]:
    """Build every store the config's training (and evaluation) sources need; (source, store totals), or
    (source, {"streaming": True}) for a streaming training source, which has no store."""
    cfg = parse_config(cfg)
    sources = list(cfg["sources"])
    normalize_ratios([s.name for s in sources], [s.ratio for s in sources])  # fail before tokenising
    if held_out:
        sources += [s.held_out() for s in cfg["sources"] if s.eval_path]
    out = []
    for source in sources:
        if source.streaming:
            out.append((", ".join(source.path), {"streaming": True}))
            continue
        docs = source_docs(cfg, source, tokenizer, progress=progress)
        path, meta, _ = docs.reopen
        out.append((", ".join(source.path), {**docs.counts, "tokens": int(docs.offsets[-1]), "store": str(path),
                                              "seconds": meta["seconds"], "dropped": meta["dropped_records"]}))
    return out


def prepare_config(data_cfg: Any, *, num_proc: int | None = None) -> None:
    """`scripts/prepare_data.py`: load the config's tokenizer, build every store, print one line per store."""
    d = dict(schema.plain(data_cfg))
    if d.get("kind") == "synthetic":
        raise DataError("data config: kind='synthetic' has no sources to prepare")
    if not d.get("tokenizer"):
        raise DataError("data config: no 'tokenizer' (a sentencepiece .model or a tokenizer directory)")
    tokenizer = load_tokenizer(d["tokenizer"])
    if num_proc is not None:
        d["num_proc"] = num_proc
    for path, info in prepare(d, tokenizer):
        if info.get("streaming"):
            print(f"{path}: streaming source, skipped (no store: it is read and tokenised while training)")
            continue
        rate = f", {info['tokens'] / info['seconds']:,.0f} tokens/s" if info["seconds"] else ""
        dropped = f", {dropped_records(info['dropped'])}" if info["dropped"] else ""
        print(f"{path}: {info['documents']:,} documents, {info['tokens']:,} tokens{rate}{dropped} -> {info['store']}")


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
    streaming = [s.name for s in cfg["sources"] if s.streaming]
    if streaming and int(cfg["workers"]):
        raise DataError(f"data config: workers={cfg['workers']} with streaming sources {streaming}; use workers=0 "
                        "(a read-ahead thread builds the batches)")

    def rows(s: Source):
        if not s.streaming:
            return packed_rows(cfg, s, tokenizer, seq_len=seq_len, seed=seed, training=True)
        return StreamingRows(cfg, s, tokenizer, seq_len=seq_len, seed=seed,
                                          process_index=process_index, process_count=process_count)

    stores = [rows(s) for s in cfg["sources"]]
    builder = BatchBuilder(stores, probs, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count, pad_id=tokenizer.pad_id)
    pipeline_class = StreamingPipeline if streaming else Pipeline
    return pipeline_class(cfg["kind"], names, probs, stores, builder, workers=int(cfg["workers"]),
                          read_ahead=int(cfg["read_ahead"]), allow_changed_data=cfg["allow_changed_data"])



def eval_batches(
    cfg_or_source: Any,
    tokenizer,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    kind: str | None = None,
    cache_dir: str | Path | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic held-out batches (no shuffling), each source's `eval_path` (else `path`) in file
    order, packed with segment ids; the last batch is padded with empty rows (loss_mask 0).

    `cfg_or_source` is a pipeline config (all its sources, one after another) or one source dict
    (one domain, for per-domain perplexity; `kind` says pretrain/sft, default pretrain; `cache_dir`: where its
    store goes, default the config's `cache_dir`)."""
    raw = dict(schema.plain(cfg_or_source))
    cfg = parse_config(raw if "sources" in raw else {"kind": kind or "pretrain", "sources": [raw]})
    if cache_dir is not None:
        cfg = {**cfg, "cache_dir": str(cache_dir)}
    stores = [
        packed_rows(cfg, s.held_out(), tokenizer, seq_len=seq_len, seed=0, training=False) for s in cfg["sources"]
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
