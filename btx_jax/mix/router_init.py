"""What a composed MoE's routers are (LoRA-MoE and FFN-MoE alike): `RouterSpec`, the options both compose specs
share (btx_jax/mix/compose.py LoraMoESpec, btx_jax/mix/compose_ffn.py FfnMoESpec), and their initial weights.

    "normal"  N(0, std^2), std 0.02 by default (what mergoo's freshly loaded gates get from HF's
              initializer_range): small random logits break top-k ties, tokens spread over all experts
    "zeros"   every expert gets the same logit; top-k then picks experts 0..k-1 for every token (jax.lax.top_k
              is stable) until the router's weights separate — see btx_jax/mix/compose.py
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from btx_jax.config import ConfigError

ROUTER_INITS = ("zeros", "normal")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """`top_k` experts mixed per token (1..experts + seed_expert, checked when composing); `seed_expert`: one
    more choice that keeps the seed/base alone (the last router output); `router_init` "normal" | "zeros" with
    `router_std`; `router_jitter`: multiplicative router-input noise while training; `router_seed`: the RNG seed
    of the router weights.  Constructing one checks every field (ConfigError naming it)."""
    top_k: int = 2
    seed_expert: bool = False
    router_init: str = "normal"
    router_std: float = 0.02
    router_jitter: float = 0.0
    router_seed: int = 0

    def __post_init__(self):
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k!r}: must be an integer >= 1")
        if not isinstance(self.seed_expert, (bool, np.bool_)):
            raise ConfigError(f"seed_expert={self.seed_expert!r}: must be true or false")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"router_init={self.router_init!r}: must be one of {', '.join(ROUTER_INITS)}")
        for name in ("router_std", "router_jitter"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a finite number >= 0")
        if not _is_int(self.router_seed) or self.router_seed < 0:
            raise ConfigError(f"router_seed={self.router_seed!r}: must be an integer >= 0")

    def check_choices(self, experts: int) -> int:
        """The router's number of outputs for `experts` experts (+ the seed expert); top_k must fit them."""
        choices = experts + int(bool(self.seed_expert))
        if experts < 1:
            raise ConfigError("compose needs at least one expert")
        if self.top_k > choices:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and the number of experts ({choices}"
                              f"{' including the seed expert' if self.seed_expert else ''})")
        return choices

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.router_seed)

    def weights(self, rng: np.random.Generator, shape) -> np.ndarray:
        """Initial router weights of `shape` (fp32), drawn from `rng` (one `self.rng()` for all of a model's)."""
        if self.router_init == "zeros":
            return np.zeros(shape, np.float32)
        return (rng.standard_normal(shape) * self.router_std).astype(np.float32)
