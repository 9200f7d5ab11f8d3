"""Initial router weights of a composed MoE (LoRA-MoE and FFN-MoE alike).

    "normal"  N(0, std^2), std 0.02 by default (what mergoo's freshly loaded gates get from HF's
              initializer_range): small random logits break top-k ties, tokens spread over all experts
    "zeros"   every expert gets the same logit; top-k then picks experts 0..k-1 for every token (jax.lax.top_k
              is stable) until the router's weights separate — see btx_jax/compose.py
"""
from __future__ import annotations

import numpy as np

from btx_jax.config import ConfigError

ROUTER_INITS = ("zeros", "normal")


def check_router_init(router_init: str) -> None:
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"router_init {router_init!r} is not one of {', '.join(ROUTER_INITS)}")


def router_weights(rng: np.random.Generator, shape, router_init: str, router_std: float) -> np.ndarray:
    if router_init == "zeros":
        return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape) * router_std).astype(np.float32)
