"""Autoregressive generation with a KV cache: one prefill pass, then one token per step (the prefix is
never recomputed).  Greedy when temperature is 0, else temperature + nucleus (top-p) sampling."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax.errors import UserError
from btx_jax.model import Llama, init_cache


class InputError(UserError, ValueError):
    """Bad model input (token ids, context length, generation arguments); the message names the argument."""


def check_ids(ids, config, new_tokens: int = 0, what: str = "input_ids") -> np.ndarray:
    """int32 [batch, seq] ids, or InputError: wrong rank, ids outside [0, vocab), or seq + new_tokens beyond the
    model's max_position_embeddings (refused, never truncated: the caller decides what to cut)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise InputError(f"{what} must be [batch, seq], got shape {list(ids.shape)}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{what} must be integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InputError(f"{what} holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
    if ids.shape[1] + new_tokens > config.max_position_embeddings:
        extra = f" + {new_tokens} new tokens" if new_tokens else ""
        raise InputError(f"{what}: {ids.shape[1]} tokens{extra} exceed the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); shorten the prompt or ask for fewer tokens")
    return ids.astype(np.int32)


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    """InputError unless max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1."""
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature={temperature!r}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p!r}: must be in (0, 1]")


def sample_token(logits_BV: jnp.ndarray, rng, temperature: float, top_p: float) -> jnp.ndarray:
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # smallest logit still inside the nucleus (the top token always is)
        cutoff_idx = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1) - 1
        cutoff_B = jnp.take_along_axis(sorted_BV, cutoff_idx[:, None], axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p"))
def generate(model: Llama, params, input_ids_BT, prompt_len, rng, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0) -> jnp.ndarray:
    """[B, max_new_tokens] new tokens after the first `prompt_len` tokens of each row.

    `input_ids_BT` may be padded on the right beyond `prompt_len` (a traced scalar), so prompts of different
    lengths share one compilation per padded length: padded positions are written to the cache by the prefill
    but never attended to, and each decode step overwrites the next one before any query can see it."""
    B, T = input_ids_BT.shape
    cache = init_cache(model.config, B, T + max_new_tokens, model.dtype)
    logits, cache = model.apply({"params": params}, input_ids_BT, cache=cache, cache_index=0)
    rng, sub = jax.random.split(rng)
    last_BV = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
    out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(sample_token(last_BV, sub, temperature, top_p))

    def step(i, carry):
        out_BN, cache, rng = carry
        prev_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
        logits, cache = model.apply({"params": params}, prev_B1, cache=cache, cache_index=prompt_len + i - 1)
        rng, sub = jax.random.split(rng)
        return out_BN.at[:, i].set(sample_token(logits[:, -1], sub, temperature, top_p)), cache, rng

    out_BN, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out_BN, cache, rng))
    return out_BN
