"""Reading and writing directories of safetensors files (single-file or sharded with an index).

Tensors are read lazily one at a time (`safe_open`, memory-mapped), so a converter never holds two full
copies of a model.  Pickle checkpoints (`pytorch_model*.bin`) can run code when loaded: they are refused
unless `allow_pickle=True`; an index.json naming shards outside its directory is refused unless
BTX_ALLOW_EXTERNAL_FILES=1.  Directories are written atomically: into a temporary sibling, then renamed
(`check_destination` says where they may be).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reads and our writes)
import numpy as np
from safetensors import safe_open

from btx_jax import disk
from btx_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor."""


ALLOW_EXTERNAL = "BTX_ALLOW_EXTERNAL_FILES"     # =1: read index.json shards outside their directory and
#                                                 frozen_from references without a digest (trusted sources only)


def external_allowed() -> bool:
    return os.environ.get(ALLOW_EXTERNAL, "") not in ("", "0")


def _shard_file(directory: Path, index: Path, name, file) -> Path:
    """The shard file an index.json `weight_map` entry names: a relative path that stays inside `directory`
    (checked lexically: symlinks inside it, as in the Hugging Face cache, are fine)."""
    if not isinstance(name, str) or not isinstance(file, str) or not file:
        raise CheckpointError(f"{index}: weight_map entry {name!r}: {file!r} is not a file name")
    path = Path(os.path.normpath(directory / file))
    if not external_allowed() and (Path(file).is_absolute() or Path(os.path.normpath(directory)) not in path.parents):
        raise CheckpointError(f"{index}: weight_map entry {name!r} names {file!r}, outside {directory} "
                              f"(set {ALLOW_EXTERNAL}=1 to read it anyway)")
    return path


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class TensorReader:
    """All tensors of a checkpoint directory, by name, read on demand as numpy arrays."""

    def __init__(self, directory: str | Path, prefix: str = "model", allow_pickle: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self._file_of: dict[str, Path] = {}
        self._pickled: dict[str, np.ndarray] | None = None
        single, index = self.directory / f"{prefix}.safetensors", self.directory / f"{prefix}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            files = {name: _shard_file(self.directory, index, name, f) for name, f in weight_map.items()}
        elif single.is_file():
            files = None
            self._index_file(single)
        else:
            self._load_pickle(prefix, allow_pickle)
            return
        if files is not None:
            for f in sorted(set(files.values())):
                self._index_file(f)
            missing = [n for n, f in files.items() if self._file_of.get(n) != f]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} is not in {files[missing[0]].name}")

    def _index_file(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    self._file_of[name] = path
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None

    def _load_pickle(self, prefix: str, allow_pickle: bool) -> None:
        bins = sorted(self.directory.glob("pytorch_model*.bin")) + sorted(self.directory.glob(f"{prefix}*.bin"))
        if not bins:
            raise CheckpointError(f"{self.directory}: no {prefix}.safetensors, "
                                  f"{prefix}.safetensors.index.json or pytorch_model.bin found")
        if not allow_pickle:
            raise CheckpointError(f"{bins[0]}: pickle checkpoint refused (loading it can execute code); "
                                  "convert it to safetensors or pass --allow-pickle / allow_pickle=True")
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{bins[0]}: reading a pickle checkpoint needs torch installed") from None
        self._pickled = {}
        for b in bins:
            for k, v in torch.load(b, map_location="cpu", weights_only=False).items():
                self._pickled[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                self._file_of[k] = b

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _check(self, name: str) -> None:
        if name not in self._file_of:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (nothing is read)."""
        self._check(name)
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        with safe_open(str(self._file_of[name]), framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        """The tensor's numpy dtype, from the file header."""
        self._check(name)
        if self._pickled is not None:
            return self._pickled[name].dtype
        with safe_open(str(self._file_of[name]), framework="numpy") as f:
            sl = f.get_slice(name)
            return np.dtype(_SAFETENSORS_DTYPES.get(sl.get_dtype()) or sl[:0].dtype)

    def get(self, name: str) -> np.ndarray:
        self._check(name)
        if self._pickled is not None:
            return check_finite(self._pickled[name], name, self._file_of[name])
        with safe_open(str(self._file_of[name]), framework="numpy") as f:
            return check_finite(f.get_tensor(name), name, self._file_of[name])

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` reading only that slice from the (memory-mapped) file."""
        self._check(name)
        if self._pickled is not None:
            return check_finite(self._pickled[name][index], name, self._file_of[name])
        with safe_open(str(self._file_of[name]), framework="numpy") as f:
            return check_finite(f.get_slice(name)[index], name, self._file_of[name])


def check_finite(arr, name: str, where) -> np.ndarray:
    """`arr`, or CheckpointError naming the tensor if it holds NaN or infinity (a model that would only ever
    produce NaN logits is refused when loaded, not discovered in its outputs)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" or "float" in str(arr.dtype):
        bad = ~np.isfinite(arr.astype(np.float32) if arr.dtype.kind != "f" else arr)
        if bad.any():
            raise CheckpointError(f"{where}: tensor {name!r} holds {int(bad.sum())} non-finite values "
                                  f"(NaN/inf) of {arr.size}; refusing to load it")
    return arr


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# safetensors' dtype names (its format spec) for the dtypes checkpoints hold
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class _ShardWriter:
    """One safetensors file written a tensor at a time: each array's bytes go to a data file as it arrives
    (nothing is kept), and `close` writes the header and then streams the data after it.  safetensors' own
    `save_file` needs every tensor of the file in memory at once: a 5 GB shard of host copies."""

    def __init__(self, path: Path):
        self.path, self.data_path = path, path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        if arr.dtype.name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {arr.dtype} cannot be stored in safetensors")
        self.header[name] = {"dtype": SAFETENSORS_DTYPES[arr.dtype.name], "shape": list(arr.shape),
                             "data_offsets": [self.size, self.size + arr.nbytes]}
        self.data.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        self.size += arr.nbytes

    def close(self) -> None:
        self.data.close()
        text = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":"))
        head = text.encode() + b" " * (-len(text.encode()) % 8)        # data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(head).to_bytes(8, "little") + head)
            shutil.copyfileobj(data, out, 64 * 2**20)
        self.data_path.unlink()


def write_tensors(directory: Path, tensors: Iterator[tuple[str, np.ndarray]], prefix: str = "model",
                  max_shard_bytes: int = 5 * 2**30, progress=None) -> None:
    """Write (name, array) pairs as `{prefix}.safetensors`, or as numbered shards plus an index file when
    the total exceeds `max_shard_bytes`.  Each array is written as it arrives and dropped (host memory: one
    array, not a shard); `progress(nbytes)` is called for each array."""
    paths: list[tuple[Path, list[str]]] = []
    shard, total = None, 0

    def start() -> _ShardWriter:
        return _ShardWriter(directory / f"{prefix}-{len(paths) + 1:05d}.safetensors")

    for name, arr in tensors:
        if shard is None:
            shard = start()
        elif shard.size and shard.size + arr.nbytes > max_shard_bytes:
            shard.close()
            paths.append((shard.path, list(shard.header)))
            shard = start()
        shard.add(name, arr)
        total += arr.nbytes
        if progress is not None:
            progress(arr.nbytes)
        del arr
    shard = shard or start()
    shard.close()
    paths.append((shard.path, list(shard.header)))
    if len(paths) == 1:
        paths[0][0].rename(directory / f"{prefix}.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(paths):
        final = directory / f"{prefix}-{i + 1:05d}-of-{len(paths):05d}.safetensors"
        path.rename(final)
        weight_map.update({n: final.name for n in names})
    (directory / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def check_destination(dst: str | Path, *, overwrite: bool | None = False, sources=(), what: str | None = None) -> Path:
    """`dst` if a directory can be written there, else CheckpointError (one line, naming `what` or `dst`):
    checked before any work.  Refused: a file, a path below a file, an existing `dst` when `overwrite` is False,
    a symlink unless `overwrite` is None (an existing directory used as it is: a workdir, a report folder), and a
    `dst` that is one of `sources`, lies inside one or contains one (replacing it would delete the source)."""
    dst = Path(dst)
    label = what or str(dst)
    if dst.is_symlink() and overwrite is not None:       # replacing it would replace the link, not its target
        raise CheckpointError(f"{label}: is a symlink (to {os.readlink(dst)}); name a real directory")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{label}: is a file, not a directory")
    parent = dst.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{label}: cannot be created: {parent} is a file")
    if dst.exists() and overwrite is False:
        raise CheckpointError(f"{label}: destination already exists (pass --overwrite to replace it)")
    target = dst.resolve()
    for src in sources:
        source = Path(src).resolve()
        relation = ("is the source" if target == source else "is inside the source" if source in target.parents
                    else "contains the source" if target in source.parents else None)
        if relation:
            raise CheckpointError(f"{label}: {relation} {src}; write elsewhere")
    return dst


TMP_PREFIX = ".{name}.tmp-"     # + PID-TOKEN-HOST: a temporary directory's owner, so stale ones can be removed


def _remove_stale(dst: Path) -> None:
    """Remove the temporary directories beside `dst` left by writers on this host that died (SIGKILL, a crash)."""
    host = socket.gethostname()
    pattern = re.compile(re.escape(TMP_PREFIX.format(name=dst.name)) + r"(\d+)-[0-9a-f]{8}-(.+)")
    for tmp in dst.parent.glob(TMP_PREFIX.format(name=glob.escape(dst.name)) + "*"):
        m = pattern.fullmatch(tmp.name)
        if m and m.group(2) == host and not _alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False, nbytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst`, on error (or an interruption) it is
    removed, and those left by writers that were killed are removed by the next one.  `dst` must pass
    `check_destination`.  Out-of-space / permission errors become a one-line DiskError naming `dst` (and `nbytes`,
    the expected size, when given: it is also checked against the free space before anything is written)."""
    dst = check_destination(dst, overwrite=overwrite)
    with disk.writing(dst, nbytes):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if nbytes:
            disk.require(dst.parent, nbytes)
        _remove_stale(dst)
        tmp = dst.parent / (TMP_PREFIX.format(name=dst.name) + f"{os.getpid()}-{secrets.token_hex(4)}-"
                                                               f"{socket.gethostname()}")
        tmp.mkdir()                  # the mode the umask gives (mkdtemp's 0700 would lock others out of dst)
    try:
        with disk.writing(dst, nbytes):
            yield tmp
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
