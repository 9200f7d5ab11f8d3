"""Lazy parameter leaves: shape and dtype known up front, values read only for the slice that is asked for.

A converter turns a checkpoint directory into `{path: leaf}` where a leaf is a `LazyLeaf` (backed by tensor
files, read slice by slice) or a plain numpy array (small, computed leaves such as fresh routers).  Both
support `leaf.shape`, `leaf.dtype`, `leaf[index]` and `np.asarray(leaf)`.  `btx_jax.mesh.place` creates
each device's shard of a leaf from `leaf[shard index]`, so a model goes from files onto a mesh without ever
existing whole in host memory or on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import numpy as np

_READS = contextvars.ContextVar("btx_jax_lazy_reads", default=None)


def normalize(index, shape: Sequence[int]) -> tuple[slice, ...]:
    """A tuple of step-1 slices with explicit bounds, one per dimension, for `index` (a slice tuple, as
    jax.make_array_from_callback passes, possibly shorter than the rank; Ellipsis is not used)."""
    index = index if isinstance(index, tuple) else (index,)
    out = []
    for dim, size in enumerate(shape):
        s = index[dim] if dim < len(index) else slice(None)
        start, stop, step = s.indices(size)
        if step != 1:
            raise ValueError(f"lazy leaves read step-1 slices only, got {s}")
        out.append(slice(start, stop))
    return tuple(out)


@contextlib.contextmanager
def reading():
    """Within the block, `read_once(key, read)` calls `read()` at most once per key; what it read is dropped when
    the block ends (`btx_jax.mesh.place` opens one per leaf placed: every device's slice comes from one read)."""
    token = _READS.set({})
    try:
        yield
    finally:
        _READS.reset(token)


def read_once(key, read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()`, or what it returned for `key` earlier in the innermost `reading()` block (outside one: read)."""
    held = _READS.get()
    if held is None:
        return read()
    if key not in held:
        held[key] = read()
    return held[key]


class LazyLeaf:
    """A [shape] `dtype` array whose slices are produced by `read(normalized slice tuple)` on demand."""

    def __init__(self, shape: Sequence[int], dtype, read: Callable[[tuple[slice, ...]], np.ndarray]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, index) -> np.ndarray:
        """The values at `index`: slices, or integers (that dimension dropped, as numpy does)."""
        index = index if isinstance(index, tuple) else (index,)
        ints = tuple(d for d, s in enumerate(index) if isinstance(s, (int, np.integer)))
        slices = tuple(slice(s % self.shape[d], s % self.shape[d] + 1) if d in ints else s
                       for d, s in enumerate(index))
        out = np.asarray(self._read(normalize(slices, self.shape)), dtype=self.dtype)
        return out.squeeze(axis=ints) if ints else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = self[tuple(slice(None) for _ in self.shape)]
        return full if dtype is None else full.astype(dtype)

    def map(self, fn: Callable[[tuple[slice, ...], np.ndarray], np.ndarray], dtype=None) -> "LazyLeaf":
        """A leaf whose slice at `index` is `fn(index, self[index])` (same shape)."""
        return LazyLeaf(self.shape, dtype or self.dtype, lambda idx: fn(idx, self[idx]))


def concat(parts: Sequence, axis: int) -> LazyLeaf:
    """The lazy concatenation of `parts` (leaves or arrays) along `axis`; a slice reads only the parts it
    overlaps."""
    parts = list(parts)
    shape = list(parts[0].shape)
    bounds = np.cumsum([0] + [p.shape[axis] for p in parts])
    shape[axis] = int(bounds[-1])
    dtype = np.result_type(*[np.dtype(p.dtype) for p in parts])

    def read(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi = index[axis].start, index[axis].stop
        pieces = []
        for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                sub = list(index)
                sub[axis] = slice(a - start, b - start)
                pieces.append(np.asarray(part[tuple(sub)], dtype))
        if not pieces:
            return np.zeros([s.stop - s.start for s in index], dtype)
        return np.concatenate(pieces, axis=axis)

    return LazyLeaf(shape, dtype, read)
