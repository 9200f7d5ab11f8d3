"""Parameter and model-FLOP counts from shapes alone (nothing is allocated, so 7B+ configs count on a laptop).

    count_params(config)                                  # {"total": N, "trainable": N, "frozen": 0}
                                                          # + "active" (per token) for an FFN-MoE
    count_params(config, [r"layers/mlp/\\w+/router", "lm_head"])
    lora_flops_per_token(arch, seq, targets, rank, experts, top_k, router, "expert")   # a LoRA / LoRA-MoE phase
    model_flops_per_token(config, seq, "expert")         # the same from a LlamaConfig (its adapter or FFN-MoE)
    ffn_moe_flops_per_token(arch, seq, experts, top_k)                               # an FFN-MoE, all training

`phase_patterns` are the phase-mask regexes of the training configs, full-matched against parameter paths
(btx_jax.param_paths.matches); None means everything is trainable.

Adapter parameters (lora_a, lora_b, router) of a LoRA-MoE restricted to `router_layers` are counted for the
routed layers only: btx_jax's scanned stack stores them in every layer (zeros, multiplied by a 0/1 layer flag),
but only the routed layers' copies exist in the model being described (and in its mergoo export).

Model FLOPs of a train step, per token (what MFU is measured against in scripts/bench.py, bench_moe.py and
gpu_check.py; remat recomputation not counted): forward 2N over the matmul weights a token runs through (a
LoRA-MoE or FFN-MoE: the k active experts only), backward input gradients 2N again, weight gradients 2N over the
trainable matmul weights only, and causal attention 2*T*d per layer forward (half the T x T scores), x3 for
forward + backward.  `arch` is a dict of LlamaConfig fields (configs/common.py ARCHS).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from btx_jax import param_paths
from btx_jax.config import ATTN_TARGETS, MLP_TARGETS, LlamaConfig
from btx_jax.model import abstract_params, routed_layers

ADAPTER_LEAF = re.compile(r"layers/\w+/\w+/(lora_a|lora_b|router)")
FFN_EXPERT_LEAF = re.compile(r"layers/moe/\w+_proj")


def leaf_counts(config: LlamaConfig) -> dict[str, int]:
    """{path: number of parameters that exist in the model}, adapter leaves counted on routed layers only."""
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


def matmul_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """{projection: (input width, output width)} of one decoder layer's matmul weights."""
    h, m = arch["hidden_size"], arch["intermediate_size"]
    q, kv = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


def _weights(arch: dict, projections) -> int:
    """Matmul weights of `projections` in one decoder layer."""
    return sum(a * b for t, (a, b) in matmul_shapes(arch).items() if t in projections)


def train_flops_per_token(arch: dict, seq: int, active: int, trainable: int) -> int:
    """Model FLOPs of one token's train step: `active` matmul weights run per token, `trainable` of them train."""
    attn_fwd = 2 * seq * arch["num_heads"] * arch["head_dim"] * arch["num_layers"]   # QK^T and AV, causal half
    return 2 * active + 2 * active + 2 * trainable + 3 * attn_fwd


def lora_flops_per_token(arch: dict, seq: int, targets, rank: int, experts: int, top_k: int, router: bool,
                         trainable: str) -> int:
    """Train FLOPs per token of a LoRA expert (router=False: one LoRA of `rank` on `targets`) or a LoRA-MoE
    (`experts` LoRAs, top_k active, a router per target) in phase `trainable` (expert | router | sft | ffn: the
    MLP kernels | full: every weight; no LoRA: targets=(), rank=0)."""
    io, L = matmul_shapes(arch), arch["num_layers"]
    attn_w, mlp_w = _weights(arch, ATTN_TARGETS), _weights(arch, MLP_TARGETS)
    lora_w = sum((io[t][0] + io[t][1]) * rank for t in targets) * (top_k if router else 1)
    router_w = sum(io[t][0] * experts for t in targets) if router else 0
    lm_head = arch["hidden_size"] * arch["vocab_size"]
    active = L * (attn_w + mlp_w + lora_w + router_w) + lm_head
    n_train = {"expert": L * lora_w, "router": L * router_w + lm_head,
               "sft": L * (attn_w + router_w) + lm_head, "ffn": L * mlp_w, "full": active}[trainable]
    return train_flops_per_token(arch, seq, active, n_train)


def model_flops_per_token(config: LlamaConfig, seq: int, phase: str) -> int:
    """Train FLOPs per token of `config` in `phase`: its LoRA or LoRA-MoE (lora_flops_per_token), its FFN-MoE
    (ffn_moe_flops_per_token), or the plain model (phase ffn | full)."""
    arch = dataclasses.asdict(config)
    if config.moe is not None:
        return ffn_moe_flops_per_token(arch, seq, config.moe.num_experts, config.moe.top_k)
    a = config.adapter
    if a is None:
        return lora_flops_per_token(arch, seq, (), 0, 1, 1, False, phase)
    return lora_flops_per_token(arch, seq, a.targets, a.experts[0].rank, len(a.experts), a.top_k, a.router, phase)


def ffn_moe_flops_per_token(arch: dict, seq: int, experts: int, top_k: int) -> int:
    """Train FLOPs per token of an FFN-MoE (`experts` SwiGLU FFNs, top_k active) with every weight training."""
    h = arch["hidden_size"]
    active = (arch["num_layers"] * (_weights(arch, ATTN_TARGETS) + top_k * _weights(arch, MLP_TARGETS) + h * experts)
              + h * arch["vocab_size"])
    return train_flops_per_token(arch, seq, active, active)
