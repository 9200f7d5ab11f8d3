"""The tokenised store: every source tokenised once, in parallel, into flat files on disk.

A store is one folder per (source, formatting options) under `cache_dir` (default `$BTX_DATA_CACHE`, else
`~/.cache/btx_jax/data`), named `{source name}-{fingerprint}`. The fingerprint covers the source's files
(path, size, mtime) or hub name/subset/split/revision, every formatting option, the tokenizer's content
digest (another tokenizer gets its own store) and the store layout version. Every later run and every phase
reuses it.

Layout (all little-endian, flat; tokens and mask read with positional reads, `TokenFile`):
  store.json        fingerprint, tokenizer digest, shard plan; written first
  shards/NNNNN.json one completion marker per finished shard (records in, documents and tokens out)
  tokens.bin        every document's token ids back to back (uint16 when the vocabulary fits, else int32)
  lengths.bin       int32 tokens per document
  mask.bin          uint8 per token, 1 where the loss counts (SFT only)
  meta.json         totals; written last: a store without it is incomplete

Building: records are read with `datasets` (Arrow, memory-mapped), cut into contiguous shards of about
`shard_mb` MB, and each shard is tokenised by `Dataset.map(batched=True, num_proc=N)` (every core by
default) into Arrow files, then appended to the flat files and marked done. A killed build resumes at the
first unfinished shard (datasets also reuses the finished per-process pieces of that shard); the flat files
are cut back to the finished shards first, so the result is byte-identical to an uninterrupted build.
Memory stays bounded by the map batch (1,000 records) per process, whatever the corpus size.

Several processes or hosts share a store through a shared filesystem path as `cache_dir` (NFS, Lustre, a
gcsfuse-mounted bucket): the build holds an exclusive lock on `{store}.lock`, so one process builds and the
others wait, then read. Preparing ahead with `scripts/prepare_data.py` avoids the wait at training time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from btx_jax.data.errors import DataError
from btx_jax.data.sft import encode_sft, sft_fields
from btx_jax.data.sources import (Source, document_texts, load_records, local_files, require_fields, source_stamp,
                                  template_fields)

STORE_VERSION = 1
DEFAULT_SHARD_MB = 64
_MAP_BATCH = 1000
_BYTES_PER_PROC = 4 << 20


class TokenFile:
    """A flat array file (`tokens.bin`, `mask.bin`) indexed like a 1-D numpy array with an integer index array,
    read with `os.preadv`, one call per run of consecutive indices (a row reads a few document pieces).

    Not a memory map: the pages of a map that rows were read from stay mapped and count in the process's RSS,
    each random read mapping up to 64 KB around it (the kernel's fault-around of cached pages; madvise(MADV_RANDOM)
    stops only the read-around of uncached ones), so the batch-building process grew with the corpus and with the
    batches read. Read pages stay in the page cache (reclaimable, shared by every process), out of RSS.
    Thread-safe (positional reads); pickled with its TokenizedDocs as a path to reopen."""

    def __init__(self, path: Path, dtype: str, size: int):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), (int(size),)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, np.int64)
        flat = index.reshape(-1)
        out = np.empty(flat.size, self.dtype)
        if not flat.size:
            return out.reshape(index.shape)
        if flat.min() < 0 or flat.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: index out of range [0, {self.shape[0]})")
        cuts = np.flatnonzero(np.diff(flat) != 1) + 1
        size = self.dtype.itemsize
        for lo, hi in zip(np.append(0, cuts).tolist(), np.append(cuts, flat.size).tolist()):
            if os.preadv(self._fd, [memoryview(out[lo:hi]).cast("B")], int(flat[lo]) * size) != (hi - lo) * size:
                raise DataError(f"store file {self.path} is shorter than its meta.json says; delete the store")
        return out.reshape(index.shape)

    def __reduce__(self):
        return TokenFile, (self.path, self.dtype.str, self.shape[0])

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


@dataclasses.dataclass
class TokenizedDocs:
    """Documents of one source as one flat token array: doc i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray | TokenFile  # [total] uint16/int32 (a store's: a TokenFile)
    offsets: np.ndarray  # [num_docs + 1] int64 (the corpus may hold more than 2^31 tokens)
    response_mask: np.ndarray | TokenFile | None  # [total] uint8, SFT only: 1 on tokens the loss counts
    first_response: np.ndarray | None  # [num_docs] int32, SFT only: index of the first response token >= 1
    counts: dict[str, int]  # documents, filtered
    reopen: tuple = ()  # (store path, meta, max_docs): pickles as a reference, never as a copy of the tokens

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """[num_docs] int32 tokens per document (made on first use: pretraining does not keep it)."""
        return np.diff(self.offsets).astype(np.int32)

    def __reduce__(self):
        return _read, self.reopen


def default_cache_dir() -> Path:
    return Path(os.environ.get("BTX_DATA_CACHE") or Path.home() / ".cache" / "btx_jax" / "data")


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Encoder:
    """Records (a batch of columns) -> token ids [+ response mask]; pickled into the map processes.
    `num_threads`: sentencepiece threads (1 in the store's map processes; streaming tokenises in one process)."""

    def __init__(self, source: Source, tokenizer, options: dict, num_threads: int = 1):
        self.source, self.tokenizer, self.options, self.num_threads = source, tokenizer, options, num_threads

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok, opt = self.tokenizer, self.options
        if opt["kind"] == "sft":
            n = len(next(iter(batch.values())))
            records = [{k: v[i] for k, v in batch.items()} for i in range(n)]
            ids, masks = encode_sft(
                self.source, tok, records, add_bos=opt["add_bos"], use_tokenizer_template=opt["use_template"],
                num_threads=self.num_threads,
            )
            first = [next((i for i, m in enumerate(mask) if m and i > 0), len(mask)) for mask in masks]
            return {"input_ids": ids, "response_mask": masks, "first_response": first}
        texts, _ = document_texts(self.source, batch)
        bos = [tok.bos_id] if opt["add_bos"] else []
        eos = [tok.eos_id] if opt["add_eos"] else []
        return {"input_ids": [bos + x + eos for x in tok.encode_batch(texts, num_threads=self.num_threads)]}


def sft_options(tokenizer, *, add_bos: bool, chat_template: str) -> dict:
    use_template = chat_template == "auto" and tokenizer.chat_template is not None
    return {"kind": "sft", "add_bos": add_bos, "use_template": use_template, "template": tokenizer.chat_template}


def pretrain_options(*, add_bos: bool, add_eos: bool) -> dict:
    return {"kind": "pretrain", "add_bos": add_bos, "add_eos": add_eos}


def encoding_options(cfg: dict, tokenizer) -> dict:
    """How a data config's documents are tokenised: the options of its stores (and of its streaming sources)."""
    if cfg["kind"] == "pretrain":
        return pretrain_options(add_bos=cfg["add_bos"], add_eos=cfg["add_eos"])
    return sft_options(tokenizer, add_bos=cfg["add_bos"], chat_template=cfg["chat_template"])


def store_path(source: Source, tokenizer, options: dict, cache_dir: str | Path | None) -> Path:
    """The folder of the source's store (fingerprint: source stamp + tokenizer + options; see module docstring)."""
    fields = dataclasses.asdict(source)
    for key in ("name", "ratio", "eval_path", "format_fn", "max_docs", "streaming"):
        fields.pop(key)
    if source.format_fn is not None:
        from datasets.fingerprint import Hasher

        fields["format_fn"] = Hasher.hash(source.format_fn)
    blob = json.dumps([STORE_VERSION, source_stamp(source), fields, options, tokenizer.fingerprint], sort_keys=True,
                      default=str)
    name = re.sub(r"[^\w.-]", "_", source.name)
    return Path(cache_dir or default_cache_dir()) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def open_store(source: Source, tokenizer, options: dict, *, cache_dir=None, num_proc=None, shard_mb=None,
               progress: bool = True) -> TokenizedDocs:
    """The source's tokenised documents, building the store first when it is missing or incomplete."""
    path = store_path(source, tokenizer, options, cache_dir)
    if not (path / "meta.json").exists():
        with _locked(path):
            if not (path / "meta.json").exists():
                build_store(source, tokenizer, options, path, num_proc=num_proc, shard_mb=shard_mb, progress=progress)
    meta = json.loads((path / "meta.json").read_text())
    if meta["tokens"] == 0 or (source.max_docs is not None and source.max_docs <= 0):
        raise DataError(
            f"source {source.name!r}: no documents left after filtering {', '.join(source.path)} "
            f"(min_chars={source.min_chars}, max_chars={source.max_chars})"
        )
    return _read(path, meta, source.max_docs)


def _read(path: Path, meta: dict, max_docs: int | None) -> TokenizedDocs:
    count = -1 if max_docs is None else max_docs
    lengths = np.fromfile(path / "lengths.bin", np.int32, count=count)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    tokens = TokenFile(path / "tokens.bin", meta["dtype"], meta["tokens"])
    mask = first = None
    if (path / "mask.bin").exists():
        mask = TokenFile(path / "mask.bin", "uint8", meta["tokens"])
        first = np.fromfile(path / "first.bin", np.int32, count=count)
    counts = {"documents": len(lengths), "filtered": int(meta["filtered"] + meta["documents"] - len(lengths))}
    return TokenizedDocs(tokens, offsets, mask, first, counts, (path, meta, max_docs))


def _shard_plan(records, shard_mb: float) -> list[tuple[int, int]]:
    n = len(records)
    per_shard = max(1, int(n * shard_mb * (1 << 20) / max(1, records.data.nbytes)))
    return [(lo, min(n, lo + per_shard)) for lo in range(0, n, per_shard)]


def check_fields(source: Source, columns: list[str], options: dict) -> None:
    """DataError when the records (with these column names) lack a field the formatting reads."""
    if options["kind"] == "sft":
        require_fields(source, columns, sft_fields(source, columns))
    else:
        require_fields(source, columns, template_fields(source))


def build_store(source: Source, tokenizer, options: dict, path: Path, *, num_proc=None, shard_mb=None,
                progress: bool = True) -> None:
    """Tokenise the source into `path` (see module docstring); resumes a killed build."""
    from tqdm.auto import tqdm

    num_proc = num_proc or default_num_proc()
    arrow_cache = path / "arrow" if local_files(source) is not None else None
    records = load_records(source, cache_dir=str(arrow_cache) if arrow_cache else None, num_proc=num_proc)
    check_fields(source, records.column_names, options)
    (path / "shards").mkdir(parents=True, exist_ok=True)
    if (path / "store.json").exists():
        plan = json.loads((path / "store.json").read_text())
    else:
        plan = {
            "version": STORE_VERSION,
            "source": dataclasses.asdict(source) | {"format_fn": None},
            "options": options,
            "tokenizer": tokenizer.fingerprint,
            "dtype": "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else "int32",
            "shards": _shard_plan(records, shard_mb or DEFAULT_SHARD_MB),
        }
        _write_json(path / "store.json", plan)
    done = _finished_shards(path, len(plan["shards"]))
    _truncate(path, done, sft=options["kind"] == "sft", dtype=plan["dtype"])
    encoder = Encoder(source, tokenizer, options)
    bar = tqdm(desc=f"tokenising {source.name}", unit="tok", unit_scale=True, disable=not progress)
    bar.update(sum(d["tokens"] for d in done))
    for index, (lo, hi) in enumerate(plan["shards"][len(done) :], start=len(done)):
        shard = records.select(range(lo, hi))
        procs = min(num_proc, 1 + shard.data.nbytes // _BYTES_PER_PROC)  # small shards: no process pool
        marker = _tokenize_shard(shard, encoder, path, index, plan["dtype"], procs)
        marker.update(records=hi - lo)
        _write_json(path / "shards" / f"{index:05d}.json", marker)
        done.append(marker)
        bar.update(marker["tokens"])
    bar.close()
    documents = sum(d["documents"] for d in done)
    meta = {
        "tokenizer": plan["tokenizer"],
        "dtype": plan["dtype"],
        "documents": documents,
        "tokens": sum(d["tokens"] for d in done),
        "filtered": sum(d["records"] for d in done) - documents if options["kind"] == "pretrain" else 0,
        "seconds": sum(d["seconds"] for d in done),
    }
    _write_json(path / "meta.json", meta)
    shutil.rmtree(path / "tmp", ignore_errors=True)
    if arrow_cache is not None:
        shutil.rmtree(arrow_cache, ignore_errors=True)


def _finished_shards(path: Path, n: int) -> list[dict]:
    done = []
    for i in range(n):
        marker = path / "shards" / f"{i:05d}.json"
        if not marker.exists():
            break
        done.append(json.loads(marker.read_text()))
    return done


def _truncate(path: Path, done: list[dict], *, sft: bool, dtype: str) -> None:
    """Cut the flat files back to the finished shards (a killed build may have appended more)."""
    tokens, docs = sum(d["tokens"] for d in done), sum(d["documents"] for d in done)
    sizes = {"tokens.bin": tokens * np.dtype(dtype).itemsize, "lengths.bin": docs * 4}
    if sft:
        sizes.update({"mask.bin": tokens, "first.bin": docs * 4})
    for name, size in sizes.items():
        with open(path / name, "ab") as f:
            f.truncate(size)


def _tokenize_shard(shard, encoder: Encoder, path: Path, index: int, dtype: str, num_proc: int) -> dict:
    """Map one shard to Arrow in parallel, then append it to the flat files; its completion marker."""
    import datasets

    start = time.perf_counter()
    sft = encoder.options["kind"] == "sft"
    features = {"input_ids": datasets.Sequence(datasets.Value("int32"))}
    if sft:
        features["response_mask"] = datasets.Sequence(datasets.Value("bool"))
        features["first_response"] = datasets.Value("int32")
    (path / "tmp").mkdir(exist_ok=True)
    mapped = shard.map(
        encoder,
        batched=True,
        batch_size=_MAP_BATCH,
        num_proc=min(num_proc, len(shard)) if num_proc > 1 else None,
        remove_columns=shard.column_names,
        features=datasets.Features(features),
        cache_file_name=str(path / "tmp" / f"shard-{index:05d}.arrow"),
        new_fingerprint=hashlib.sha256(f"{path}-{index}".encode()).hexdigest()[:16],
    )
    n_docs = n_tokens = 0
    with open(path / "tokens.bin", "ab") as ft, open(path / "lengths.bin", "ab") as fl:
        fm = open(path / "mask.bin", "ab") if sft else contextlib.nullcontext()
        ff = open(path / "first.bin", "ab") if sft else contextlib.nullcontext()
        with fm, ff:
            for batch in mapped.data.table.to_batches():
                ids = batch.column("input_ids")
                ft.write(ids.flatten().to_numpy().astype(dtype).tobytes())
                fl.write(ids.value_lengths().to_numpy(zero_copy_only=False).astype(np.int32).tobytes())
                if sft:
                    mask = batch.column("response_mask").flatten().to_numpy(zero_copy_only=False)
                    fm.write(mask.astype(np.uint8).tobytes())
                    ff.write(batch.column("first_response").to_numpy().astype(np.int32).tobytes())
                n_docs += len(ids)
                n_tokens += len(ids.flatten())
    del mapped
    for f in (path / "tmp").glob(f"shard-{index:05d}*"):
        f.unlink()
    return {"documents": n_docs, "tokens": n_tokens, "seconds": time.perf_counter() - start}
