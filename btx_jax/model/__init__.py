"""Flax Llama with LoRA / LoRA-MoE linears or an FFN-MoE (mixture of full FFN experts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from btx_jax import param_paths
from btx_jax.config import LlamaConfig
from btx_jax.model.llama import Llama, init_cache, routed_layers
from btx_jax.model.lora import routed_count, summarize_aux

__all__ = ["Llama", "init_cache", "routed_layers", "summarize_aux", "routed_count", "init_params", "init_leaves",
           "abstract_params", "abstract_leaves"]


def _init(config: LlamaConfig, rng, param_dtype):
    model = Llama(config, param_dtype=param_dtype)
    return model.init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: LlamaConfig, rng=None, param_dtype=jnp.float32) -> dict:
    """Random parameters (HF-like init: normal(0.02), norms 1, LoRA A kaiming / B zero)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.jit(_init, static_argnums=(0, 2))(config, rng, param_dtype)


def abstract_params(config: LlamaConfig, param_dtype=jnp.float32) -> dict:
    """ShapeDtypeStruct tree of the parameters; nothing is allocated (works for 7B on a laptop)."""
    return jax.eval_shape(lambda rng: _init(config, rng, param_dtype), jax.random.PRNGKey(0))


def abstract_leaves(config: LlamaConfig, param_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of the parameters (nothing is allocated)."""
    return param_paths.flatten(abstract_params(config, param_dtype))


def init_leaves(config: LlamaConfig, seed: int, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The leaves named in `target` ({path: ShapeDtypeStruct with a sharding}) as `init_params(config,
    PRNGKey(seed))` would give them, each created directly in its dtype and sharding; the model's other
    leaves are never materialised (the compiler drops what is not returned)."""
    if not target:
        return {}

    def fresh(rng):
        flat = param_paths.flatten(_init(config, rng, jnp.float32))
        return {p: flat[p].astype(s.dtype) for p, s in target.items()}

    return jax.jit(fresh, out_shardings={p: s.sharding for p, s in target.items()})(jax.random.PRNGKey(seed))
