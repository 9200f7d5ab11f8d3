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
  where           dict  keep only the records whose columns equal these values, e.g. {"is_correct": True}
                        (str, int, float or bool values; read before formatting, not counted as filtered)
  streaming       bool  False (default): tokenised once into a store; True: read with
                        `datasets.load_dataset(..., streaming=True)` and tokenised while training, no
                        store (btx_jax.data.streaming)
  instruction_field / input_field / output_field / messages_field / system        [sft]
                        column names (defaults instruction/input/output/messages) and an
                        optional system prompt prepended to every example

Hub datasets: `path="wikimedia/wikipedia", subset="20231101.ja"` or the shorthand
`path="wikimedia/wikipedia:20231101.ja"`; `revision` pins a hub commit (part of the store fingerprint). A
local directory is read the same way (`datasets.load_dataset(dir, subset)`), so a copy of a hub dataset
(its README.md `configs:` and data files) works offline.

Sources are tokenised once into a store on disk (btx_jax.data.store), or with `streaming=True` read as an
`IterableDataset` and tokenised while training (btx_jax.data.streaming); this module only reads records and
formats them into document texts, one batch of records at a time.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import string
from pathlib import Path
from typing import Any, Callable

from btx_jax import disk
from btx_jax.data import bundled
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
    revision: str | None = None
    ratio: float = 1.0
    eval_path: tuple[str, ...] | None = None
    sample_by: str = "line"
    text_field: str = "text"
    template: str | None = None
    format_fn: Callable[[dict], str] | None = None
    min_chars: int = 1
    max_chars: int | None = None
    max_docs: int | None = None
    where: dict[str, Any] | None = None
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    system: str | None = None
    streaming: bool = False

    @classmethod
    def from_dict(cls, spec: Any) -> "Source":
        spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        if "bundled" in spec:          # {"bundled": "wiki", "ratio": ...}: a corpus shipped with the package
            domain = spec.pop("bundled")
            if domain not in bundled.DOMAINS:
                raise DataError(f"source: unknown bundled corpus {domain!r} (choose from {', '.join(bundled.DOMAINS)})")
            spec = {**bundled.bundled_source(domain, spec.pop("ratio", 1.0)), **spec}
        if "path" not in spec:
            raise DataError(f"source {spec.get('name', spec)!r}: missing 'path'")
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DataError(f"source {spec.get('name', spec['path'])!r}: unknown keys {sorted(unknown)}")
        for key in ("path", "eval_path"):
            if isinstance(spec.get(key), (str, Path)):
                spec[key] = (bundled.resolve(spec[key]),)
            elif spec.get(key) is not None:
                spec[key] = tuple(bundled.resolve(p) for p in spec[key])
        hub_name, _, subset = spec["path"][0].rpartition(":")
        if len(spec["path"]) == 1 and hub_name and "/" not in subset and spec.get("subset") is None:
            if spec.get("format") == "hub" or not Path(spec["path"][0]).exists():
                spec["path"], spec["subset"] = (hub_name,), subset  # "org/dataset:subset" shorthand
        default_name = Path(spec["path"][0]).stem
        spec.setdefault("name", f"{default_name}_{spec['subset']}" if spec.get("subset") else default_name)
        if spec.get("format") is not None and spec["format"] not in _FORMATS:
            raise DataError(f"source {spec['name']!r}: format {spec['format']!r} not one of {sorted(_FORMATS)}")
        where = spec.get("where")
        if where is not None and (not isinstance(where, dict) or not where or not all(
                isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in where.items())):
            raise DataError(f"source {spec['name']!r}: where must map column names to str/int/float/bool values, "
                            f"not {where!r}")
        if not isinstance(spec.get("streaming", False), bool):
            raise DataError(f"source {spec['name']!r}: streaming must be True or False, not {spec['streaming']!r}")
        return cls(**spec)

    def held_out(self) -> "Source":
        """The same source reading `eval_path` (or `path` when there is none). Held-out files of a streaming
        source are small: they go through a store."""
        if self.streaming and not self.eval_path:
            raise DataError(
                f"source {self.name!r}: streams its training data and has no eval_path; set eval_path to "
                "held-out files (they are tokenised into a store)"
            )
        return dataclasses.replace(self, path=self.eval_path or self.path, eval_path=None, streaming=False)


def local_files(source: Source) -> list[Path] | None:
    """The files of a local source, or None for a hub dataset."""
    if source.format == "hub":
        return None
    files: list[Path] = []
    for pattern in source.path:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for m in matches:
            if Path(m).is_file():
                files.append(Path(m))
            elif source.format is None and len(source.path) == 1 and (Path(m).is_dir() or _looks_like_hub(m)):
                return None  # "org/dataset" on the hub, or a local directory laid out like one
            else:
                raise DataError(f"source {source.name!r}: file not found: {m}")
        if not matches:
            raise DataError(f"source {source.name!r}: no file matches {pattern}")
    return files


def _looks_like_hub(name: str) -> bool:
    return not Path(name).suffix and name.count("/") == 1 and not Path(name).exists()


def source_stamp(source: Source, digests: Path) -> list:
    """What identifies the source's bytes: (path, size, content digest) of every local file (every file under a
    local dataset directory; `file_digest`, remembered under `digests`), or the hub name, subset, split and
    revision."""
    files = local_files(source)
    if files is None and Path(source.path[0]).is_dir():
        files = sorted(p for p in Path(source.path[0]).rglob("*") if p.is_file())
    if files is None:
        return [source.path[0], source.subset, source.split, source.revision]
    return [(str(f.resolve()), f.stat().st_size, file_digest(f, digests)) for f in files]


def file_digest(path: Path, digests: Path) -> str:
    """blake2b of the file's bytes (streamed). Remembered in `digests/` under the file's path with its stat
    (size, mtime, ctime, inode): an edit, even one that restores size and mtime, changes the ctime, so a file is
    read again exactly when it may have changed."""
    path = path.resolve()
    st = path.stat()
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    memo = digests / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if saved["path"] == str(path) and saved["stat"] == stat:
            return saved["blake2b"]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run another read
        digests.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path), "stat": stat, "blake2b": digest}))
        os.replace(tmp, memo)
    return digest


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


def _first_bad_json_line(path: Path) -> str | None:
    """'line N: reason' of the first line of a jsonl file that is not a JSON object (1-based), or None."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number}: not a JSON object"
            except json.JSONDecodeError as e:
                return f"line {number}: {e.msg} at column {e.colno}"
    return None


# Rows per record batch of the Arrow files `load_dataset` writes (datasets' default: 1000).  Every process that
# opens the Dataset reads each batch's header through the memory map, and the kernel maps the pages around it:
# at 1000 rows that is ~30 MB of RSS per GB of corpus; the json/text/parquet/csv builders write whole chunks
# (about 10 MB), so larger batches hold nothing more in memory.
WRITER_BATCH_ROWS = 100_000


def load_records(source: Source, cache_dir: str | None = None, *, streaming: bool = False):
    """The source's rows as a memory-mapped `datasets.Dataset` (Arrow files under `cache_dir`, else
    the datasets cache; local files are checked to be UTF-8 text first; read in this process: datasets' `num_proc`
    forks, which is unsafe once JAX has started its threads), or with `streaming` as a
    `datasets.IterableDataset` that reads the files (or the hub) as it is iterated (a bad file is then found
    when it is read: `read_error`)."""
    import datasets

    files = local_files(source)
    if files is None:     # a local directory's Arrow files go to `cache_dir` too: datasets' own cache keys them by
        # the directory's layout, not its path or contents, so two copies laid out alike would share one entry
        local = not streaming and Path(source.path[0]).is_dir()
        return _where(source, _load_hub(source, streaming=streaming, cache_dir=cache_dir if local else None))
    builder = _builder(source, files)
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"source {source.name!r}: {f} is empty")
        if builder != "parquet" and not streaming:
            _check_utf8(source, f)
    kwargs = {"sample_by": source.sample_by} if builder == "text" else {}
    if not streaming:
        kwargs.update(cache_dir=cache_dir, writer_batch_size=WRITER_BATCH_ROWS)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                   **kwargs)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        fault = disk.fault_of(e)
        if fault is not None and cache_dir is not None:  # the Arrow files could not be written
            raise disk.DiskError(disk.message(cache_dir, fault[0])) from None
        raise read_error(source, e) from None
    if not streaming and len(ds) == 0:
        raise DataError(f"source {source.name!r}: no records in {', '.join(source.path)}")
    return _where(source, ds)


def _where(source: Source, ds):
    """The records of `ds` that match the source's `where` (all of them when it has none)."""
    if not source.where:
        return ds
    if ds.column_names is not None:  # a streaming json source may not know its columns before reading
        require_fields(source, list(ds.column_names), list(source.where))
    where = dict(source.where)
    return ds.filter(lambda batch: [all(row) for row in zip(*([x == v for x in batch[k]] for k, v in where.items()))],
                     batched=True)


def read_error(source: Source, error: Exception) -> DataError:
    """The one-line DataError for a failure to read the source's records: the first non-UTF-8 file or broken
    jsonl line where there is one (local files), else the cause (`cause_of`)."""
    if isinstance(error, DataError):
        return error
    files = local_files(source)
    builder = _builder(source, files) if files else None
    for f in files or []:
        if builder != "parquet":
            try:
                _check_utf8(source, f)
            except DataError as e:
                return e
        if builder == "json" and (bad := _first_bad_json_line(f)) is not None:
            return DataError(f"source {source.name!r}: {f} {bad}")
    return DataError(f"source {source.name!r}: cannot read {', '.join(source.path)} ({cause_of(error)})")


def cause_of(error: Exception) -> str:
    """The cause of a datasets error as one line: its cause's message, lines joined; for a worker's traceback
    (datasets with num_proc > 1 re-raises it as a quoted text), the first exception in it: the root cause."""
    text = str(error.__cause__ or error).strip()
    if text.startswith('"""'):
        lines = text.strip('"').strip().splitlines() + [""]
        first = next((i for i, line in enumerate(lines) if re.match(r"(\w+\.)*\w*(Error|Exception): ", line)), 0)
        text = "\n".join(lines[first:lines.index("", first)])
    return " ".join(text.split()) or type(error).__name__


def _load_hub(source: Source, streaming: bool = False, cache_dir: str | None = None):
    """A hub dataset (or a local directory laid out like one; its Arrow files under `cache_dir` when given);
    one line when it cannot be resolved."""
    import datasets

    name = source.path[0]
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no retry warnings: the failure is reported below in one line
    try:
        return datasets.load_dataset(name, source.subset, split=source.split, revision=source.revision,
                                     streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types here (connection, not found, offline, bad config)
        offline = " (not in the local datasets cache, and the hub is offline or does not have it)"
        local = Path(name).is_dir()
        raise DataError(
            f"source {source.name!r}: cannot load {'dataset directory' if local else 'hub dataset'} {name!r}"
            f"{f' subset {source.subset!r}' if source.subset else ''} split {source.split!r}"
            f"{'' if local else offline}: {cause_of(e)}"
        ) from None
    finally:
        hub_log.setLevel(level)


def require_fields(source: Source, columns: list[str], fields: list[str]) -> None:
    """DataError naming the first of `fields` that is not among the records' `columns`."""
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(
            f"source {source.name!r}: field {missing[0]!r} not in {', '.join(source.path)} "
            f"(columns: {', '.join(columns)})"
        )


def document_texts(source: Source, batch: dict[str, list]) -> tuple[list[str], dict[str, int]]:
    """A batch of records (columns) as document texts after formatting and the length filters, and how many
    records were dropped for each reason (`null text`, `shorter than min_chars=N`, `longer than max_chars=N`)."""
    n = len(next(iter(batch.values()))) if batch else 0
    if source.format_fn is not None:
        texts = [source.format_fn({k: v[i] for k, v in batch.items()}) for i in range(n)]
    elif source.template is not None:
        fields = list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(source.template) if f))
        texts = [source.template.format(**{f: batch[f][i] for f in fields}) for i in range(n)]
    else:
        texts = batch[source.text_field]
    kept, dropped = [], collections.Counter()
    for t in texts:
        reason = ("null text" if t is None else f"shorter than min_chars={source.min_chars}"
                  if len(t) < source.min_chars else f"longer than max_chars={source.max_chars}"
                  if source.max_chars is not None and len(t) > source.max_chars else None)
        if reason is None:
            kept.append(t)
        else:
            dropped[reason] += 1
    return kept, dropped


def record_location(source: Source, row: int) -> str:
    """Where the source's `row`-th record (0-based, in file order) is: 'FILE line N' in a jsonl file, 'FILE row
    N' in a parquet file, else 'record N of PATHS' (also after a `where` filter, which renumbers the records)."""
    files = local_files(source)
    fallback = f"record {row + 1} of {', '.join(source.path)}"
    if files is None or source.where or _builder(source, files) not in ("json", "parquet"):
        return fallback
    left = row
    for f in files:
        if _builder(source, [f]) == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(f).metadata.num_rows
            if left < rows:
                return f"{f} row {left + 1}"
            left -= rows
            continue
        with f.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if number == 1 and line.lstrip().startswith("["):
                    return fallback  # a JSON array, not one record per line
                if line.strip():
                    if left == 0:
                        return f"{f} line {number}"
                    left -= 1
    return fallback


def template_fields(source: Source) -> list[str]:
    """The record fields a pretraining source reads (checked before tokenising)."""
    if source.format_fn is not None:
        return []
    if source.template is not None:
        return [f for _, f, _, _ in string.Formatter().parse(source.template) if f]
    return [source.text_field]
