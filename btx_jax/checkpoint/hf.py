"""Hugging Face Llama checkpoints <-> btx_jax parameter trees, through the PARAM_TABLE mapping.

Per-layer HF tensors are stacked into the scanned [layers, ...] leaves (and split back on export); HF's
[out, in] linears are transposed to btx_jax's [in, out].  Every tensor's shape is checked against the config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from btx_jax import param_paths
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
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """{path: array} for the selected leaves of `config`'s parameter tree, read from `reader`.

    `key_of(path, hf_key)` renames the table's HF key (PEFT / mergoo prefixes)."""
    shapes = param_paths.flatten(abstract_params(config))
    out = {}
    for path, sds in shapes.items():
        if not select(path):
            continue
        rule = param_paths.rule_for(path)
        arr = None
        for i, key in param_paths.hf_keys(path, config.num_layers, num_experts(config)):
            t = reader.get(key_of(path, key))
            t = t.T if rule.transpose else t
            want = sds.shape[param_paths.index_rank(i):]
            if t.shape != tuple(want):
                raise CheckpointError(f"{reader.directory}: tensor {key_of(path, key)!r} has shape "
                                      f"{list(t.shape)[::-1] if rule.transpose else list(t.shape)}, expected "
                                      f"{list(want)[::-1] if rule.transpose else list(want)}")
            target_dtype = dtype or t.dtype
            if i is None:
                arr = np.asarray(t, dtype=target_dtype)
            else:
                if arr is None:
                    arr = np.empty(sds.shape, dtype=target_dtype)
                arr[i] = t
            if progress:
                progress(t.nbytes)
        out[path] = arr
    return out


def load_base(directory: str | Path, config: LlamaConfig, dtype=None, allow_pickle: bool = False,
              progress=None) -> dict[str, np.ndarray]:
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
