"""Source specs, loading records through Hugging Face `datasets`, and the per-source token cache.

A source is a dict (or ConfigDict) with these keys (only `path` is required):

  name            str   label in stats/state (default: file stem)
  path            str | list[str]  local file(s) or glob(s), or a hub dataset name
  format          json|jsonl|parquet|csv|text|hub   (default: from the file suffix;
                        .txt/.raw -> text; a path that does not exist and has no suffix -> hub)
  subset          str   hub dataset config name (hub only)
  split           str   split to read (default "train"; local files are all read as one split)
  ratio           float mixture weight (default 1.0; normalised over sources)
  eval_path       str | list[str]  held-out file(s) for `eval_batches` (default: `path`)
  sample_by       line|paragraph|document   text files only (default "line")
  text_field      str   column holding the text (default "text")          [pretrain]
  template        str   e.g. "Question: {question}\\nAnswer: {answer}"; overrides text_field
  format_fn       callable record -> str; overrides both (not cached across processes)
  min_chars       int   drop texts shorter than this (default 1: drops empty lines)
  max_chars       int   drop texts longer than this (default: no limit)
  max_docs        int   keep only the first max_docs texts/records after filtering
  instruction_field / input_field / output_field / messages_field / system        [sft]
                        column names (defaults instruction/input/output/messages) and an
                        optional system prompt prepended to every example

Tokenised sources are cached in memory per process (key: tokenizer content hash, file paths with
size and mtime, and every option), and on disk as .npz when `cache_dir` is given, so epochs and
repeated pipelines never re-tokenise.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import string
from pathlib import Path
from typing import Any, Callable

import numpy as np

from btx_jax.data.errors import DataError

_SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".raw": "text",
}
_FORMATS = {"json", "jsonl", "parquet", "csv", "text", "hub"}


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: tuple[str, ...]
    format: str | None = None
    subset: str | None = None
    split: str = "train"
    ratio: float = 1.0
    eval_path: tuple[str, ...] | None = None
    sample_by: str = "line"
    text_field: str = "text"
    template: str | None = None
    format_fn: Callable[[dict], str] | None = None
    min_chars: int = 1
    max_chars: int | None = None
    max_docs: int | None = None
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    system: str | None = None

    @classmethod
    def from_dict(cls, spec: Any) -> "Source":
        spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        if "path" not in spec:
            raise DataError(f"source {spec.get('name', spec)!r}: missing 'path'")
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DataError(f"source {spec.get('name', spec['path'])!r}: unknown keys {sorted(unknown)}")
        for key in ("path", "eval_path"):
            if isinstance(spec.get(key), (str, Path)):
                spec[key] = (str(spec[key]),)
            elif spec.get(key) is not None:
                spec[key] = tuple(str(p) for p in spec[key])
        spec.setdefault("name", Path(spec["path"][0]).stem)
        if spec.get("format") is not None and spec["format"] not in _FORMATS:
            raise DataError(f"source {spec['name']!r}: format {spec['format']!r} not one of {sorted(_FORMATS)}")
        return cls(**spec)

    def held_out(self) -> "Source":
        """The same source reading `eval_path` (or `path` when there is none)."""
        return dataclasses.replace(self, path=self.eval_path or self.path, eval_path=None)


def _resolve_local(source: Source) -> list[Path] | None:
    """The files of a local source, or None for a hub dataset."""
    if source.format == "hub":
        return None
    files: list[Path] = []
    for pattern in source.path:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for m in matches:
            if Path(m).is_file():
                files.append(Path(m))
            elif source.format is None and not Path(m).suffix and "/" in m and not Path(m).exists():
                return None  # e.g. "org/dataset": a hub name
            else:
                raise DataError(f"source {source.name!r}: file not found: {m}")
        if not matches:
            raise DataError(f"source {source.name!r}: no file matches {pattern}")
    return files


def _builder(source: Source, files: list[Path]) -> str:
    if source.format is not None:
        return "json" if source.format == "jsonl" else source.format
    builders = {_SUFFIX_FORMATS.get(f.suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise DataError(f"source {source.name!r}: cannot infer one format from {[f.name for f in files]}; set 'format'")
    return builders.pop()


def _check_utf8(source: Source, path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"source {source.name!r}: {path} is not UTF-8 text (bad byte at offset {offset + e.start})"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"source {source.name!r}: {path} is not UTF-8 text (truncated character at end)") from None


def load_records(source: Source):
    """The source's rows as a `datasets.Dataset`."""
    import datasets

    files = _resolve_local(source)
    try:
        if files is None:
            return datasets.load_dataset(source.path[0], source.subset, split=source.split)
        builder = _builder(source, files)
        if builder != "parquet":
            for f in files:
                _check_utf8(source, f)
        kwargs = {"sample_by": source.sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        if isinstance(e, DataError):
            raise
        cause = str(e.__cause__ or e).strip().splitlines()
        raise DataError(
            f"source {source.name!r}: cannot read {', '.join(source.path)} ({cause[0] if cause else type(e).__name__})"
        ) from None


def require_fields(source: Source, dataset, fields: list[str]) -> None:
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise DataError(
            f"source {source.name!r}: field {missing[0]!r} not in {', '.join(source.path)} "
            f"(columns: {', '.join(dataset.column_names)})"
        )


def source_texts(source: Source) -> tuple[list[str], int]:
    """The source's documents as strings after formatting and length filters, and how many were
    filtered out."""
    ds = load_records(source)
    if source.format_fn is not None:
        texts = [source.format_fn(r) for r in ds]
    elif source.template is not None:
        fields = [f for _, f, _, _ in string.Formatter().parse(source.template) if f]
        require_fields(source, ds, fields)
        columns = {f: ds[f] for f in dict.fromkeys(fields)}
        texts = [source.template.format(**{f: columns[f][i] for f in columns}) for i in range(len(ds))]
    else:
        require_fields(source, ds, [source.text_field])
        texts = list(ds[source.text_field])
    kept = [
        t
        for t in texts
        if t is not None and len(t) >= source.min_chars and (source.max_chars is None or len(t) <= source.max_chars)
    ]
    kept = kept[: source.max_docs] if source.max_docs is not None else kept
    if not kept:
        raise DataError(
            f"source {source.name!r}: no documents left after filtering {', '.join(source.path)} "
            f"(min_chars={source.min_chars}, max_chars={source.max_chars})"
        )
    return kept, len(texts) - len(kept)


@dataclasses.dataclass
class TokenizedDocs:
    """Documents of one source as one flat token array: doc i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # [total] int32
    offsets: np.ndarray  # [num_docs + 1] int64
    response_mask: np.ndarray | None  # [total] bool, SFT only: True on tokens the loss counts
    counts: dict[str, int]  # documents, filtered, ...

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> (flat int32 tokens, int64 offsets)."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


_MEMORY_CACHE: dict[str, TokenizedDocs] = {}


def _cache_key(source: Source, tokenizer, extra: dict) -> str | None:
    if source.format_fn is not None:
        return None
    files = _resolve_local(source)
    stamp = (
        [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        if files is not None
        else list(source.path)
    )
    fields = {
        k: v for k, v in dataclasses.asdict(source).items() if k not in ("name", "ratio", "eval_path", "format_fn")
    }
    blob = json.dumps([stamp, fields, tokenizer.fingerprint, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_tokenize(
    source: Source, tokenizer, extra: dict, build: Callable[[], TokenizedDocs], cache_dir: str | None = None
) -> TokenizedDocs:
    """`build()` once per (source, tokenizer, extra options); memory and optional .npz disk cache."""
    key = _cache_key(source, tokenizer, extra)
    if key is None:
        return build()
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    disk = Path(cache_dir) / f"{source.name}-{key}.npz" if cache_dir else None
    if disk is not None and disk.exists():
        with np.load(disk) as z:
            docs = TokenizedDocs(
                z["tokens"],
                z["offsets"],
                z["response_mask"] if "response_mask" in z else None,
                json.loads(str(z["counts"])),
            )
    else:
        docs = build()
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            arrays = {"tokens": docs.tokens, "offsets": docs.offsets, "counts": json.dumps(docs.counts)}
            if docs.response_mask is not None:
                arrays["response_mask"] = docs.response_mask
            np.savez(disk, **arrays)
    _MEMORY_CACHE[key] = docs
    return docs


def tokenize_texts(
    source: Source, tokenizer, *, add_bos: bool, add_eos: bool, cache_dir: str | None = None
) -> TokenizedDocs:
    """Pretraining documents of a source: [BOS] text [EOS] each, tokenised once and cached."""

    def build() -> TokenizedDocs:
        texts, filtered = source_texts(source)
        bos = [tokenizer.bos_id] if add_bos else []
        eos = [tokenizer.eos_id] if add_eos else []
        ids = [bos + x + eos for x in tokenizer.encode_batch(texts)]
        tokens, offsets = flatten(ids)
        return TokenizedDocs(tokens, offsets, None, {"documents": len(texts), "filtered": filtered})

    return cached_tokenize(source, tokenizer, {"kind": "pretrain", "bos": add_bos, "eos": add_eos}, build, cache_dir)
