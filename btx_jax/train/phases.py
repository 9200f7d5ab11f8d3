"""Which parameters train in each phase: regex tables over parameter paths (btx_jax/param_paths.py).

    expert  LoRA A/B only (phase 1: one domain expert on the seed model)
    ffn     the MLP weights only (phase 1 of the paper's BTX: a full-FFN expert; compose with FfnMoESpec mixes them)
    router  routers (LoRA-MoE or FFN-MoE) + lm_head (phase 2, the seed recipe's choice)
    sft     everything except the MLP / FFN experts and the LoRA experts (phase 3, the seed's choice)
    full    everything (pretraining the seed model)

A config may replace a phase's patterns with `config.trainable`.
"""
from __future__ import annotations

from btx_jax import param_paths
from btx_jax.config import ConfigError

# One pattern each (alternatives joined): every pattern of a phase must match a parameter of the model it
# trains (btx_jax/train/validate.py), and a model has LoRA-MoE routers per linear OR an FFN-MoE router per layer.
ROUTERS = (r"layers/\w+/\w+/router|layers/moe/router/kernel",)
PHASES: dict[str, tuple[str, ...]] = {
    "expert": (r"layers/\w+/\w+/lora_[ab]",),
    "ffn": (r"layers/mlp/\w+/kernel|layers/moe/\w+_proj",),
    "router": (*ROUTERS, r"lm_head"),
    "sft": (r"embed_tokens", r"lm_head", r"final_norm/scale", r"layers/\w+_norm/scale",
            r"layers/attn/\w+/kernel", *ROUTERS),
    "full": (r".*",),
}


def trainable_patterns(phase: str, override=None) -> tuple[str, ...]:
    if override:
        return tuple(override)
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r} (choose from {', '.join(PHASES)})")
    return PHASES[phase]


def split(leaves: dict, patterns) -> tuple[dict, dict]:
    """(trainable, frozen) parts of {path: leaf}: the paths full-matching any of `patterns`, and the rest;
    ConfigError if nothing is trainable."""
    trainable = {k: v for k, v in leaves.items() if param_paths.matches(k, patterns)}
    if not trainable:
        raise ConfigError(f"trainable patterns {list(patterns)} match no parameter of this model")
    return trainable, {k: v for k, v in leaves.items() if k not in trainable}


def merge(trainable: dict, frozen: dict) -> dict:
    return param_paths.unflatten({**param_paths.flatten(frozen), **param_paths.flatten(trainable)})
