"""Parameter counts from abstract shapes (jax.eval_shape: nothing is allocated, so 7B+ configs count on a laptop).

    count_params(config)                                  # {"total": N, "trainable": N, "frozen": 0}
                                                          # + "active" (per token) for an FFN-MoE
    count_params(config, [r"layers/mlp/\\w+/router", "lm_head"])

`phase_patterns` are the phase-mask regexes of the training configs, full-matched against parameter paths
(btx_jax.param_paths.matches); None means everything is trainable.

Adapter parameters (lora_a, lora_b, router) of a LoRA-MoE restricted to `router_layers` are counted for the
routed layers only: btx_jax's scanned stack stores them in every layer (zeros, multiplied by a 0/1 layer flag),
but only the routed layers' copies exist in the model being described (and in its mergoo export).
"""
from __future__ import annotations

import re

import numpy as np

from btx_jax import param_paths
from btx_jax.config import LlamaConfig

ADAPTER_LEAF = re.compile(r"layers/\w+/\w+/(lora_a|lora_b|router)")
FFN_EXPERT_LEAF = re.compile(r"layers/moe/\w+_proj")


def leaf_counts(config: LlamaConfig) -> dict[str, int]:
    """{path: number of parameters that exist in the model}, adapter leaves counted on routed layers only."""
    from btx_jax.model import abstract_params, routed_layers
    shapes = abstract_params(config)
    n_routed = int(routed_layers(config).sum())
    out = {}
    for path, sds in param_paths.flatten(shapes).items():
        size = int(np.prod(sds.shape, dtype=np.int64))
        if ADAPTER_LEAF.fullmatch(path):
            size = size // config.num_layers * n_routed
        out[path] = size
    return out


def count_params(config: LlamaConfig, phase_patterns=None) -> dict[str, int]:
    """{"total", "trainable", "frozen"} parameter counts of `config` (trainable: paths matching a pattern)."""
    counts = leaf_counts(config)
    if phase_patterns is None:
        trainable = sum(counts.values())
    else:
        if isinstance(phase_patterns, str):
            phase_patterns = [phase_patterns]
        trainable = sum(n for p, n in counts.items() if param_paths.matches(p, list(phase_patterns)))
    total = sum(counts.values())
    out = {"total": total, "trainable": trainable, "frozen": total - trainable}
    if config.moe is not None:     # paper-style active parameters: each token runs top_k of the FFN experts
        m = config.moe
        experts = sum(n for p, n in counts.items() if FFN_EXPERT_LEAF.fullmatch(p))
        out["active"] = total - experts // m.num_experts * (m.num_experts - m.top_k)
    return out
