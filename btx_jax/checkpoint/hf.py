"""Hugging Face Llama checkpoints <-> btx_jax parameter trees, through the PARAM_TABLE mapping.

Per-layer HF tensors are stacked into the scanned [layers, ...] leaves (and split back on export); HF's
[out, in] linears are transposed to btx_jax's [in, out].  Every tensor's shape is checked against the config.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from btx_jax import param_paths
from btx_jax.checkpoint.lazy import LazyLeaf
from btx_jax.checkpoint.tensor_files import CheckpointError, TensorReader, read_json
from btx_jax.config import LlamaConfig
from btx_jax.model import abstract_params

BASE_LEAF = re.compile(r"embed_tokens|lm_head|.*/(kernel|scale)")


def num_experts(config: LlamaConfig) -> int:
    return 0 if config.moe is None else config.moe.num_experts


def read_config(directory: str | Path) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, the raw config.json dict) of an HF model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    raw = read_json(directory / "config.json")
    return LlamaConfig.from_hf(raw, source=str(directory / "config.json")), raw


def load_leaves(reader: TensorReader, config: LlamaConfig, select: Callable[[str], bool],
                key_of: Callable[[str, str], str] = lambda path, key: key, dtype=None,
                progress: Callable[[int], None] | None = None) -> dict[str, LazyLeaf]:
    """{path: lazy leaf} for the selected leaves of `config`'s parameter tree, backed by `reader`'s tensors.

    Shapes are checked against the config from the file headers; values are read per slice on demand
    (a stacked [layers, ...] leaf reads only the layers and rows asked for).  `key_of(path, hf_key)` renames
    the table's HF key (PEFT / mergoo prefixes); `progress(nbytes)` is called per slice read."""
    shapes = param_paths.flatten(abstract_params(config))
    out = {}
    for path, sds in shapes.items():
        if select(path):
            out[path] = _leaf(reader, path, tuple(sds.shape), config, key_of, dtype, progress)
    return out


def _leaf(reader, path: str, shape: tuple[int, ...], config: LlamaConfig, key_of, dtype, progress) -> LazyLeaf:
    rule = param_paths.rule_for(path)
    keys = {i: key_of(path, key) for i, key in param_paths.hf_keys(path, config.num_layers, num_experts(config))}
    lead = param_paths.index_rank(next(iter(keys)))        # leading dims stacked from separate tensors
    want = shape[lead:]
    for key in keys.values():
        got = reader.shape(key)
        if tuple(got[::-1] if rule.transpose else got) != tuple(want):
            raise CheckpointError(f"{reader.directory}: tensor {key!r} has shape {list(got)}, expected "
                                  f"{list(want)[::-1] if rule.transpose else list(want)}")
    stored = dtype or reader.dtype(next(iter(keys.values())))

    def read_one(key: str, index: tuple[slice, ...]) -> np.ndarray:
        t = reader.get_slice(key, index[::-1] if rule.transpose else index)
        if progress:
            progress(t.nbytes)
        return np.asarray(t.T if rule.transpose else t, dtype=stored)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if lead == 0:
            return read_one(keys[None], index)
        out = np.empty([s.stop - s.start for s in index], stored)
        for pos in itertools.product(*(range(s.start, s.stop) for s in index[:lead])):
            at = tuple(p - s.start for p, s in zip(pos, index))
            out[at] = read_one(keys[pos if lead > 1 else pos[0]], index[lead:])
        return out

    return LazyLeaf(shape, stored, read)


def load_base(directory: str | Path, config: LlamaConfig, dtype=None, allow_pickle: bool = False,
              progress=None) -> dict[str, LazyLeaf]:
    """Base-model leaves (embedding, norms, projection kernels, lm_head) of an HF Llama directory."""
    reader = TensorReader(directory, allow_pickle=allow_pickle)
    return load_leaves(reader, config, lambda p: bool(BASE_LEAF.fullmatch(p)), dtype=dtype, progress=progress)


def export_tensors(flat: dict[str, np.ndarray], config: LlamaConfig, select: Callable[[str], bool],
                   key_of: Callable[[str, str], str] = lambda path, key: key) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) for the selected leaves, one layer slice at a time."""
    for path in sorted(flat):
        if not select(path):
            continue
        rule = param_paths.rule_for(path)
        arr = flat[path]
        for i, key in param_paths.hf_keys(path, config.num_layers, num_experts(config)):
            t = np.asarray(arr if i is None else arr[i])
            yield key_of(path, key), (t.T if rule.transpose else t)
