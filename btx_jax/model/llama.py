"""Flax Llama: embedding, RMSNorm, rotary attention (GQA, segment ids, KV cache), SwiGLU MLP
(or an FFN-MoE of SwiGLU experts, btx_jax/model/moe_ffn.py), lm_head.

Layers are stacked and run with `nn.scan` (one compiled layer for any depth) under a configurable remat
policy. Parameter paths (see btx_jax/param_paths.py) are the single naming scheme used by sharding rules,
phase masks and checkpoint key mapping.  Dtype policy: weights live in `param_dtype`, matmuls run in `dtype`;
norms, softmax and the returned logits are fp32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from btx_jax.config import REMAT_CHOICES, LlamaConfig
from btx_jax.model.attention import DEFAULT_BLOCK, DEFAULT_IMPL, cached_attention, causal_attention
from btx_jax.model.lora import Linear
from btx_jax.model.moe_ffn import MoEFFN
from btx_jax.model.rope import apply_rope, inv_frequencies
from btx_jax.model.swiglu import swiglu

def _save_all_but_casts(prim, *_, **__) -> bool:
    """Keep every intermediate for the backward pass except dtype casts (a bf16 frozen weight cast to an fp32
    compute dtype would otherwise be saved per layer: an fp32 copy of the frozen model)."""
    return prim.name != "convert_element_type"


REMAT_POLICIES = dict(zip(REMAT_CHOICES, (           # none, full, dots, dots_no_batch (btx_jax/config.py)
    _save_all_but_casts, jax.checkpoint_policies.nothing_saveable, jax.checkpoint_policies.checkpoint_dots,
    jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims), strict=True))


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        scale = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * x).astype(self.dtype)


class _Sub(nn.Module):
    """Shared fields of the attention and MLP blocks."""
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    attention: str = DEFAULT_IMPL       # btx_jax/model/attention.py IMPLS
    attention_block: int = DEFAULT_BLOCK

    def linear(self, features: int, target: str) -> Linear:
        return Linear(features, target, self.config.adapter, self.dtype, self.param_dtype,
                      self.deterministic, name=target)


class Attention(_Sub):
    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, routed, cache, cache_index):
        c = self.config
        B, T, _ = x_BTD.shape
        N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
        mask_BT = (segment_ids_BT > 0).astype(jnp.float32)
        q_BTNH = self.linear(N * H, "q_proj")(x_BTD, routed, mask_BT).reshape(B, T, N, H)
        k_BTKH = self.linear(K * H, "k_proj")(x_BTD, routed, mask_BT).reshape(B, T, K, H)
        v_BTKH = self.linear(K * H, "v_proj")(x_BTD, routed, mask_BT).reshape(B, T, K, H)
        inv_freq = inv_frequencies(H, c.rope_theta, c.rope_scaling_dict)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
        if cache is None:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, self.attention, self.attention_block)
            new_cache = None
        else:
            k_BSKH = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTKH.astype(cache["k"].dtype), cache_index, 1)
            v_BSKH = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTKH.astype(cache["v"].dtype), cache_index, 1)
            new_cache = {"k": k_BSKH, "v": v_BSKH}
            out_BTNH = cached_attention(q_BTNH, k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype), cache_index)
        return self.linear(c.hidden_size, "o_proj")(out_BTNH.reshape(B, T, N * H), routed, mask_BT), new_cache


class MLP(_Sub):
    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT, routed):
        c = self.config
        mask_BT = (segment_ids_BT > 0).astype(jnp.float32)
        gate_BTM = self.linear(c.intermediate_size, "gate_proj")(x_BTD, routed, mask_BT)
        up_BTM = self.linear(c.intermediate_size, "up_proj")(x_BTD, routed, mask_BT)
        h_BTM = swiglu(gate_BTM, up_BTM, self.dtype)
        return self.linear(c.hidden_size, "down_proj")(h_BTM, routed, mask_BT)


class DecoderLayer(_Sub):
    @nn.compact
    def __call__(self, x_BTD, xs, positions_BT, segment_ids_BT, cache_index):
        c = self.config
        kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic,
                  attention=self.attention, attention_block=self.attention_block)
        h, new_cache = Attention(name="attn", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="input_norm")(x_BTD),
            positions_BT, segment_ids_BT, xs["routed"], xs.get("cache"), cache_index)
        x_BTD = x_BTD + h.astype(x_BTD.dtype)
        x_norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="post_norm")(x_BTD)
        if c.moe is None:
            h = MLP(name="mlp", **kw)(x_norm, segment_ids_BT, xs["routed"])
        else:
            h = MoEFFN(c, self.dtype, self.param_dtype, self.deterministic, name="moe")(x_norm, segment_ids_BT)
        return x_BTD + h.astype(x_BTD.dtype), new_cache


class Llama(nn.Module):
    """Causal LM. `__call__(input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None, cache_index=0)`
    returns fp32 logits [B, T, V], and the updated cache when one is given.  With `return_hidden=True` it
    returns (final hidden states [B, T, D] in the compute dtype, lm_head weight [D, V]) instead, for a loss
    that applies the head itself (btx_jax/model/chunked_ce.py)."""
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    deterministic: bool = True
    attention: str = DEFAULT_IMPL       # "xla": jax.nn.dot_product_attention with a full [T, T] mask
    attention_block: int = DEFAULT_BLOCK

    @nn.compact
    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None, cache_index=0,
                 return_hidden: bool = False):
        c = self.config
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        embedding = self.param("embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size),
                               self.param_dtype)
        x_BTD = jnp.take(embedding, input_ids_BT, axis=0).astype(self.dtype)
        xs = {"routed": jnp.asarray(routed_layers(c))}
        if cache is not None:
            xs["cache"] = cache
        layer = DecoderLayer
        layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0, "aux": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers)
        x_BTD, new_cache = stack(c, self.dtype, self.param_dtype, self.deterministic, self.attention,
                                 self.attention_block, name="layers")(
            x_BTD, xs, positions_BT, segment_ids_BT, cache_index)
        x_BTD = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="final_norm")(x_BTD)
        if c.tie_word_embeddings:
            head_DV = embedding.T
        else:
            head_DV = self.param("lm_head", nn.initializers.normal(0.02), (c.hidden_size, c.vocab_size),
                                 self.param_dtype)
        if return_hidden:
            return (x_BTD, head_DV) if cache is None else ((x_BTD, head_DV), new_cache)
        # tokens as 2-D rows: the lm_head weight gradient is then a plain [D, N] x [N, V] matmul (a 3-D
        # contraction made XLA:CPU transpose the [N, V] logits gradient first)
        logits_BTV = jnp.dot(x_BTD.reshape(B * T, -1), head_DV.astype(self.dtype),
                             preferred_element_type=jnp.float32).reshape(B, T, -1)
        return logits_BTV if cache is None else (logits_BTV, new_cache)


def routed_layers(config: LlamaConfig) -> np.ndarray:
    """[layers] 1.0 where the adapter is active (mergoo's router_layers_index), else 0.0."""
    flags = np.ones(config.num_layers, np.float32)
    if config.adapter is not None and config.adapter.router_layers is not None:
        flags[:] = 0.0
        flags[list(config.adapter.router_layers)] = 1.0
    return flags


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
