"""The tokenised store: every source tokenised once, in parallel, into flat files on disk.

A store is one folder per (source, formatting options) under `cache_dir` (default `$BTX_DATA_CACHE`, else
`~/.cache/btx_jax/data`), named `{source name}-{fingerprint}`. The fingerprint covers the source's files
(path, size and a blake2b digest of the bytes: `sources.file_digest`) or hub name/subset/split/revision, every
formatting option, the tokenizer's content digest (another tokenizer gets its own store) and the store layout
version. Every later run and every phase reuses it.

Layout (all little-endian, flat; tokens and mask read with positional reads, `TokenFile`):
  store.json        fingerprint, tokenizer digest, shard plan; written first
  shards/NNNNN.json one completion marker per finished shard (records in, documents and tokens out, records
                    dropped per reason)
  tokens.bin        every document's token ids back to back (uint16 when the vocabulary fits, else int32)
  lengths.bin       int32 tokens per document
  mask.bin          uint8 per token, 1 where the loss counts (SFT only)
  first.bin         int32 per document, its first response token (SFT only)
  meta.json         totals, records dropped per reason, each flat file's size and checksums (blake2b of the
                    whole file and of _SAMPLES sampled blocks; `check_store`); written last: a store without it
                    is incomplete

Building: records are read with `datasets` (Arrow, memory-mapped), cut into contiguous shards of about
`shard_mb` MB, and each shard is tokenised in batches of _MAP_BATCH records by a `TokenizingPool` (processes
started with "spawn", which die with their parent; every core by default from 64 MB of records), appended in
order to the flat files and marked done. A killed build resumes at the first unfinished shard; the flat files
are cut back to the finished shards first, so the result is byte-identical to an uninterrupted build.
Memory stays bounded by the batches in flight, whatever the corpus size.

Several processes or hosts share a store through a shared filesystem path as `cache_dir` (NFS, Lustre, a
gcsfuse-mounted bucket): the build holds an exclusive record lock on `{store}.lock` (btx_jax/lock.py), so one process
builds and the others wait, then read. Preparing ahead with `scripts/prepare_data.py` avoids the wait at
training time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from btx_jax.lock import held
from btx_jax.data.errors import DataError
from btx_jax.data.interrupt import BuildInterrupted
from btx_jax.data.sft import encode_sft, missing_field, sft_fields
from btx_jax.data.sources import (Source, document_texts, load_records, local_files, record_location, require_fields,
                                  source_stamp, template_fields)

STORE_VERSION = 2
DEFAULT_SHARD_MB = 64
_MAP_BATCH = 1000
_BYTES_PER_PROC = 4 << 20
# Starting the tokenising processes ("spawn": each imports btx_jax) takes 5-20 s; one process tokenises about
# 10 MB/s, so by default (num_proc=None) a smaller corpus is tokenised in this process.
_POOL_MIN_BYTES = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10  # a sampled checksum reads 4 MiB of a file
_REMAP_READS = 64  # batches of _MAP_BATCH records read through one memory map of the records (RecordReader)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
    """Records (a batch of columns) -> token ids [+ response mask]; sent to the tokenising processes.
    `num_threads`: sentencepiece threads (1 in the store's tokenising processes; streaming tokenises in one)."""

    def __init__(self, source: Source, tokenizer, options: dict, num_threads: int = 1):
        self.source, self.tokenizer, self.options, self.num_threads = source, tokenizer, options, num_threads

    def __call__(self, batch: dict[str, list], first_row: int = 0) -> tuple[dict[str, list], dict[str, int]]:
        """(the kept records' token ids [+ response masks and first response tokens], records dropped per
        reason). An SFT record without its prompt or response is a DataError naming where it is (`first_row`:
        the index of the batch's first record in the source), or with `skip_bad_records` dropped and counted."""
        tok, opt = self.tokenizer, self.options
        if opt["kind"] == "sft":
            n = len(next(iter(batch.values())))
            records, dropped = [], collections.Counter()
            for i in range(n):
                record = {k: v[i] for k, v in batch.items()}
                field = missing_field(self.source, record)
                if field is None:
                    records.append(record)
                elif opt["skip_bad_records"]:
                    dropped[f"no {field}"] += 1
                else:
                    raise DataError(f"source {self.source.name!r}: {record_location(self.source, first_row + i)}: "
                                    f"the record has no {field!r} (set data.skip_bad_records=True to skip such "
                                    "records)")
            ids, masks = encode_sft(
                self.source, tok, records, add_bos=opt["add_bos"], use_tokenizer_template=opt["use_template"],
                num_threads=self.num_threads,
            )
            first = [next((i for i, m in enumerate(mask) if m and i > 0), len(mask)) for mask in masks]
            return {"input_ids": ids, "response_mask": masks, "first_response": first}, dropped
        texts, dropped = document_texts(self.source, batch)
        bos = [tok.bos_id] if opt["add_bos"] else []
        eos = [tok.eos_id] if opt["add_eos"] else []
        return {"input_ids": [bos + x + eos for x in tok.encode_batch(texts, num_threads=self.num_threads)]}, dropped


def sft_options(tokenizer, *, add_bos: bool, chat_template: str, skip_bad_records: bool = False) -> dict:
    use_template = chat_template == "auto" and tokenizer.chat_template is not None
    return {"kind": "sft", "add_bos": add_bos, "use_template": use_template, "template": tokenizer.chat_template,
            "skip_bad_records": skip_bad_records}


def pretrain_options(*, add_bos: bool, add_eos: bool) -> dict:
    return {"kind": "pretrain", "add_bos": add_bos, "add_eos": add_eos}


def encoding_options(cfg: dict, tokenizer) -> dict:
    """How a data config's documents are tokenised: the options of its stores (and of its streaming sources)."""
    if cfg["kind"] == "pretrain":
        return pretrain_options(add_bos=cfg["add_bos"], add_eos=cfg["add_eos"])
    return sft_options(tokenizer, add_bos=cfg["add_bos"], chat_template=cfg["chat_template"],
                       skip_bad_records=cfg["skip_bad_records"])


def store_path(source: Source, tokenizer, options: dict, cache_dir: str | Path | None) -> Path:
    """The folder of the source's store (fingerprint: source stamp + tokenizer + options; see module docstring)."""
    fields = dataclasses.asdict(source)
    for key in ("name", "ratio", "eval_path", "format_fn", "max_docs", "streaming"):
        fields.pop(key)
    if source.format_fn is not None:
        from datasets.fingerprint import Hasher

        fields["format_fn"] = Hasher.hash(source.format_fn)
    cache = Path(cache_dir or default_cache_dir())
    blob = json.dumps([STORE_VERSION, source_stamp(source, cache / "digests"), fields, options, tokenizer.fingerprint],
                      sort_keys=True, default=str)
    name = re.sub(r"[^\w.-]", "_", source.name)
    return cache / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def open_store(source: Source, tokenizer, options: dict, *, cache_dir=None, num_proc=None, shard_mb=None,
               progress: bool = True, verify: str = "sampled") -> TokenizedDocs:
    """The source's tokenised documents, building the store first when it is missing or incomplete; its files
    are checked against the checksums in its meta (`verify`: "sampled", cheap, or "full"; `check_store`)."""
    path = store_path(source, tokenizer, options, cache_dir)
    if not (path / "meta.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with held(Path(f"{path}.lock"), "store build", wait=True):
            if not (path / "meta.json").exists():
                build_store(source, tokenizer, options, path, num_proc=num_proc, shard_mb=shard_mb, progress=progress)
    meta = json.loads((path / "meta.json").read_text())
    check_store(path, meta, full=verify == "full")
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


def _flat_sizes(tokens: int, docs: int, *, sft: bool, dtype: str) -> dict[str, int]:
    """Bytes of each flat file of a store with this many tokens and documents."""
    sizes = {"tokens.bin": tokens * np.dtype(dtype).itemsize, "lengths.bin": docs * 4}
    if sft:
        sizes.update({"mask.bin": tokens, "first.bin": docs * 4})
    return sizes


def _checksum(path: Path, full: bool) -> str:
    """blake2b of the file (`full`), or of _SAMPLES blocks of _SAMPLE_BYTES spread evenly over it, first and
    last included (the whole file when it is smaller than that)."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with path.open("rb") as f:
        if full or size <= _SAMPLES * _SAMPLE_BYTES:
            return hashlib.file_digest(f, lambda: h).hexdigest()
        for offset in np.linspace(0, size - _SAMPLE_BYTES, _SAMPLES).astype(np.int64).tolist():
            h.update(os.pread(f.fileno(), _SAMPLE_BYTES, offset))
    return h.hexdigest()


def check_store(path: Path, meta: dict, *, full: bool = False) -> None:
    """DataError (one line, "delete the store and rebuild") when a flat file of the store is not the size its
    meta gives or does not match its checksum (sampled blocks, or with `full` every byte)."""
    for name, want in meta["checksums"].items():
        file = path / name
        size = file.stat().st_size if file.exists() else None
        if size != want["size"]:
            found = "missing" if size is None else f"{size:,} bytes, not {want['size']:,}"
            raise DataError(f"store {path}: {name} is damaged ({found}); delete the store and rebuild "
                            f"(rm -r {path})")
        if _checksum(file, full) != want["full" if full else "sampled"]:
            raise DataError(f"store {path}: {name} does not match its checksum ({'full' if full else 'sampled'} "
                            f"blake2b); delete the store and rebuild (rm -r {path})")


def _shard_plan(records, shard_mb: float) -> list[tuple[int, int]]:
    n = len(records)
    per_shard = max(1, int(n * shard_mb * (1 << 20) / max(1, records.data.nbytes)))
    return [(lo, min(n, lo + per_shard)) for lo in range(0, n, per_shard)]


def check_fields(source: Source, columns: list[str], options: dict, features=None) -> None:
    """DataError when the records (with these column names, and these `datasets` features when known) lack a
    field the formatting reads, or hold something other than text in the text field."""
    if options["kind"] == "sft":
        require_fields(source, columns, sft_fields(source, columns))
        return
    require_fields(source, columns, template_fields(source))
    if features is not None and source.template is None and source.format_fn is None:
        kind = getattr(features[source.text_field], "dtype", type(features[source.text_field]).__name__)
        if kind not in ("string", "large_string", "null"):
            raise DataError(f"source {source.name!r}: field {source.text_field!r} of {', '.join(source.path)} "
                            f"holds {kind} values, not text (set text_field, or a template such as "
                            f"'{{{source.text_field}}}')")


def build_store(source: Source, tokenizer, options: dict, path: Path, *, num_proc=None, shard_mb=None,
                progress: bool = True) -> None:
    """Tokenise the source into `path` (see module docstring); resumes a killed build."""
    from tqdm.auto import tqdm

    local = local_files(source) is not None or Path(source.path[0]).is_dir()    # files, or a hub-style folder
    arrow_cache = path / "arrow" if local else None
    records = load_records(source, cache_dir=str(arrow_cache) if arrow_cache else None)
    check_fields(source, records.column_names, options, records.features)
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
    sft = options["kind"] == "sft"
    done = _finished_shards(path, len(plan["shards"]))
    _truncate(path, done, sft=sft, dtype=plan["dtype"])
    encoder = Encoder(source, tokenizer, options)
    bar = tqdm(desc=f"tokenising {source.name}", unit="tok", unit_scale=True, disable=not progress)
    bar.update(sum(d["tokens"] for d in done))
    if num_proc is None:  # every core, where the corpus is large enough to pay for starting them
        num_proc = default_num_proc() if records.data.nbytes >= _POOL_MIN_BYTES else 1
    procs = min(num_proc, 1 + records.data.nbytes // _BYTES_PER_PROC)
    try:
        with TokenizingPool(records, encoder, plan["dtype"], procs) as pool:
            for index, (lo, hi) in enumerate(plan["shards"][len(done):], start=len(done)):
                marker = _tokenize_shard(pool, lo, hi, path, index, sft)
                marker.update(records=hi - lo)
                _write_json(path / "shards" / f"{index:05d}.json", marker)
                done.append(marker)
                bar.update(marker["tokens"])
    except BuildInterrupted as e:
        e.kept.append(f"{len(done)} of {len(plan['shards'])} shards of {path}")
        raise
    finally:
        bar.close()
    documents = sum(d["documents"] for d in done)
    dropped = sum((collections.Counter(d["dropped"]) for d in done), collections.Counter())
    sizes = _flat_sizes(sum(d["tokens"] for d in done), documents, sft=sft, dtype=plan["dtype"])
    meta = {
        "tokenizer": plan["tokenizer"],
        "dtype": plan["dtype"],
        "documents": documents,
        "tokens": sum(d["tokens"] for d in done),
        "filtered": sum(d["records"] for d in done) - documents,
        "dropped_records": dict(dropped),
        "seconds": sum(d["seconds"] for d in done),
        "checksums": {name: {"size": size, "sampled": _checksum(path / name, False),
                             "full": _checksum(path / name, True)} for name, size in sizes.items()},
    }
    _write_json(path / "meta.json", meta)
    if dropped:
        print(f"[btx] {source.name}: {meta['filtered'] + documents:,} records read, {dropped_records(dropped)}",
              file=sys.stderr, flush=True)
    if arrow_cache is not None:
        shutil.rmtree(arrow_cache, ignore_errors=True)


def dropped_records(dropped: dict[str, int]) -> str:
    """'dropped N records (reason: n, ...)': a store's `dropped_records` in words."""
    reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(dropped.items()))
    return f"dropped {sum(dropped.values()):,} records ({reasons})"


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
    sizes = _flat_sizes(sum(d["tokens"] for d in done), sum(d["documents"] for d in done), sft=sft, dtype=dtype)
    for name, size in sizes.items():
        with open(path / name, "ab") as f:
            f.truncate(size)


class RecordReader:
    """Row ranges of a source's records (a memory-mapped `datasets.Dataset`), mapped afresh every _REMAP_READS
    reads: the pages read through a map count in the process's RSS until it is closed, so a reader of the whole
    corpus would grow with it. Pickles as the Dataset's own pickle (dill; its Arrow file paths, not its rows)."""

    def __init__(self, records):
        import dill

        self._pickled, self._records, self._reads = dill.dumps(records), records, 0

    def __getstate__(self) -> dict:
        return {"_pickled": self._pickled}

    def __setstate__(self, state: dict) -> None:
        self._pickled, self._records, self._reads = state["_pickled"], None, 0

    def read(self, lo: int, hi: int) -> dict[str, list]:
        if self._records is None or self._reads == _REMAP_READS:
            import dill

            self._records = None  # the old map is closed before the new one opens
            self._records, self._reads = dill.loads(self._pickled), 0
        self._reads += 1
        return self._records[lo:hi]


def _encode_rows(records: RecordReader, encoder: Encoder, dtype: str, lo: int, hi: int) -> tuple:
    """Records lo..hi-1 as flat arrays, (tokens, lengths, response mask | None, first response | None), and the
    records dropped per reason."""
    encoded, dropped = encoder(records.read(lo, hi), first_row=lo)
    ids = encoded["input_ids"]
    lengths = np.array([len(x) for x in ids], np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    if encoder.options["kind"] != "sft":
        return (flat, lengths, None, None), dropped
    mask = np.fromiter(itertools.chain.from_iterable(encoded["response_mask"]), np.uint8, count=len(flat))
    return (flat, lengths, mask, np.array(encoded["first_response"], np.int32)), dropped


_WORK: tuple = ()  # a tokenising process's (RecordReader, encoder, dtype), set by _start_worker


def _start_worker(parent: int, work: bytes) -> None:
    """Initializer of a tokenising process: it dies with the process that started it (Linux: PR_SET_PDEATHSIG;
    elsewhere a thread watching the parent), leaves SIGINT and SIGTERM to that process (a Ctrl-C reaches the
    whole process group), and loads its work (dill: a source's `format_fn` may be a lambda)."""
    global _WORK
    import dill

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the above
        os._exit(1)
    _WORK = dill.loads(work)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _encode_in_worker(lo: int, hi: int) -> tuple:
    return _encode_rows(*_WORK, lo, hi)


class TokenizingPool:
    """Encodes ranges of records in order: in this process (`procs` <= 1), else in `procs` processes started
    with the "spawn" method (safe after JAX started its threads, unlike fork) that die with this process."""

    def __init__(self, records, encoder: Encoder, dtype: str, procs: int):
        self.work, self.procs, self._executor = (RecordReader(records), encoder, dtype), procs, None

    def __enter__(self) -> "TokenizingPool":
        if self.procs > 1:
            import multiprocessing

            import dill

            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.procs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(os.getpid(), dill.dumps(self.work)))
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:  # an interrupted build does not wait for the batches in flight
            self._executor.shutdown(wait=exc[0] is None, cancel_futures=True)

    def encode(self, lo: int, hi: int):
        """The encoded batches (`_encode_rows`) of records lo..hi-1, _MAP_BATCH records each, in order."""
        starts = range(lo, hi, _MAP_BATCH)
        ends = [min(hi, a + _MAP_BATCH) for a in starts]
        if self._executor is None:
            yield from (_encode_rows(*self.work, a, b) for a, b in zip(starts, ends))
            return
        try:
            yield from self._executor.map(_encode_in_worker, starts, ends)
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(
                f"source {self.work[1].source.name!r}: a tokenising process died (killed for lack of memory? fewer "
                "data.num_proc use less; a script that builds stores needs an `if __name__ == '__main__':` guard, "
                "as its processes are started with 'spawn' and import it)") from None


def _tokenize_shard(pool: TokenizingPool, lo: int, hi: int, path: Path, index: int, sft: bool) -> dict:
    """Encode records lo..hi-1 (shard `index`) and append them to the flat files; its completion marker."""
    start = time.perf_counter()
    n_docs = n_tokens = 0
    dropped = collections.Counter()
    names = ("tokens.bin", "lengths.bin", "mask.bin", "first.bin")[: 4 if sft else 2]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(path / name, "ab")) for name in names]
        for arrays, batch_dropped in pool.encode(lo, hi):
            for f, array in zip(files, arrays):
                f.write(array.tobytes())
            n_docs += len(arrays[1])
            n_tokens += len(arrays[0])
            dropped.update(batch_dropped)
    return {"documents": n_docs, "tokens": n_tokens, "dropped": dict(dropped), "seconds": time.perf_counter() - start}
