"""The FFN-MoE block of Branch-Train-MiX (Sukhbaatar et al. 2024) and Mixtral: a mixture of full SwiGLU FFNs.

    logits = x W_router                      (fp32, router on the layer's hidden state after post_norm)
    w, idx = softmax over the top-k logits    (== Mixtral: softmax over all, top-k, renormalised)
    y      = sum_{j < k} w_j * FFN_{idx_j}(x),   FFN_e(x) = (silu(x G_e) * (x U_e)) D_e

Expert weights are stacked on a leading expert axis: `gate_proj`, `up_proj` [E, D, M], `down_proj` [E, M, D]
(the `expert` logical axis, which the mesh rules can shard: expert parallelism).  Each token runs only its k
experts: the N*k (token, expert) slots are sorted by expert and multiplied group by group —

    ragged   `jax.lax.ragged_dot` (XLA:CPU and XLA:GPU in jax 0.10.2 expand it densely, E x the work, so
             "auto" picks it only on TPU; docs/gpu_moe.md)
    segment  every expert's group is padded to a multiple of `tile` rows and the rows are cut into tiles that
             each belong to one expert; a batched matmul of the tiles against their experts' weights (gathered
             per tile).  Exact (no token is dropped); computes N*k + E*tile rows.  "auto" on CPU and GPU.
    dense    the reference: every expert on every token, mixed by the dense [N, E] gates (E/k x the FLOPs).

The router sows the same statistics as the LoRA-MoE's routers (btx_jax/model/lora.py router_aux: Switch/BTX
load balancing, z-loss, token fractions, mean gate weights) under `aux/moe/router`, so `summarize_aux`, the
train step and the evaluation's routing heatmaps work unchanged.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from btx_jax.config import LlamaConfig
from btx_jax.model.lora import dense_gates, router_aux, top_k_softmax
from btx_jax.model.swiglu import swiglu

MAX_TILE = 512


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The dispatch `impl` means on `platform` (default: JAX's default backend, which is "cpu" while compiling
    for compile-only GPU or TPU devices: pass the platform of the mesh's devices there)."""
    if impl != "auto":
        return impl
    return "ragged" if (platform or jax.default_backend()) == "tpu" else "segment"


def for_platform(config: LlamaConfig, platform: str) -> LlamaConfig:
    """`config` with its FFN-MoE's impl "auto" resolved for the devices of `platform` (unchanged otherwise)."""
    if config.moe is None or config.moe.impl != "auto":
        return config
    return config.replace(moe=dataclasses.replace(config.moe, impl=resolve_impl("auto", platform)))


def tile_rows(slots: int, num_experts: int) -> int:
    """Rows per tile of the segment scheme: about a quarter of an expert's average group, a power of two in
    [8, MAX_TILE] (padding costs at most E * tile rows, i.e. ~25 % of N*k; smaller tiles gather more weights)."""
    target = max(slots // (4 * num_experts), 8)
    return min(1 << (target.bit_length() - 1), MAX_TILE)


def _ffn(x, gate, up, down, matmul):
    h = swiglu(matmul(x, gate), matmul(x, up), x.dtype)
    return matmul(h, down)


def _sort_slots(idx_NK: jnp.ndarray, num_experts: int):
    """(order [S]: slot ids sorted by expert (stable), inverse permutation [S], group sizes [E])."""
    flat_S = idx_NK.reshape(-1)
    order_S = jnp.argsort(flat_S, stable=True)
    inverse_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(order_S.shape[0], dtype=order_S.dtype))
    sizes_E = jnp.bincount(flat_S, length=num_experts).astype(jnp.int32)
    return order_S, inverse_S, sizes_E


def _combine(y_sorted_SD, inverse_S, weights_NK):
    """Unsort the slots' outputs and mix them with the routing weights (fp32): [N, D]."""
    N, K = weights_NK.shape
    y_NKD = y_sorted_SD[inverse_S].reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK)


def ragged_ffn(x_ND, gate_EDM, up_EDM, down_EMD, weights_NK, idx_NK):
    order_S, inverse_S, sizes_E = _sort_slots(idx_NK, gate_EDM.shape[0])
    x_SD = x_ND[order_S // idx_NK.shape[1]]
    y_SD = _ffn(x_SD, gate_EDM, up_EDM, down_EMD, lambda a, w: jax.lax.ragged_dot(a, w, sizes_E))
    return _combine(y_SD, inverse_S, weights_NK)


def segment_ffn(x_ND, gate_EDM, up_EDM, down_EMD, weights_NK, idx_NK, tile: int | None = None):
    N, K = idx_NK.shape
    E, S = gate_EDM.shape[0], N * K
    tile = tile or tile_rows(S, E)
    order_S, inverse_S, sizes_E = _sort_slots(idx_NK, E)
    padded_E = -(-sizes_E // tile) * tile
    pad_start_E = jnp.cumsum(padded_E) - padded_E
    start_E = jnp.cumsum(sizes_E) - sizes_E
    expert_S = idx_NK.reshape(-1)[order_S]
    row_S = pad_start_E[expert_S] + jnp.arange(S) - start_E[expert_S]     # sorted slot -> padded row
    n_tiles = -(-S // tile) + E                                          # static bound on sum ceil(s_e / tile)
    token_R = jnp.zeros(n_tiles * tile, jnp.int32).at[row_S].set((order_S // K).astype(jnp.int32))
    tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(n_tiles) * tile, side="right"),
                              E - 1)
    x_GTD = x_ND[token_R].reshape(n_tiles, tile, -1)                    # pad rows read token 0, then are dropped
    y_GTD = _ffn(x_GTD, gate_EDM[tile_expert], up_EDM[tile_expert], down_EMD[tile_expert],
                    lambda a, w: jnp.einsum("gti,gio->gto", a, w))
    return _combine(y_GTD.reshape(n_tiles * tile, -1)[row_S], inverse_S, weights_NK)


def dense_ffn(x_ND, gate_EDM, up_EDM, down_EMD, weights_NK, idx_NK):
    """Reference: all experts on all tokens, mixed by the dense gates (zero for unselected experts)."""
    gates_NE = dense_gates(weights_NK, idx_NK, gate_EDM.shape[0])
    x_END = jnp.broadcast_to(x_ND, (gate_EDM.shape[0], *x_ND.shape))
    y_END = _ffn(x_END, gate_EDM, up_EDM, down_EMD, lambda a, w: jnp.einsum("eni,eio->eno", a, w))
    return jnp.einsum("end,ne->nd", y_END.astype(jnp.float32), gates_NE)


IMPLS = {"ragged": ragged_ffn, "segment": segment_ffn, "dense": dense_ffn}


class Router(nn.Module):
    """Bias-free router [D, E] on the hidden state; sows the LoRA-MoE's router statistics."""
    num_experts: int
    top_k: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_ND, mask_N):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x_ND.shape[-1], self.num_experts),
                            self.param_dtype)
        logits_NE = x_ND.astype(jnp.float32) @ kernel.astype(jnp.float32)
        weights_NK, idx_NK = top_k_softmax(logits_NE, self.top_k)
        gates_NE = dense_gates(weights_NK, idx_NK, self.num_experts)
        for name, value in router_aux(logits_NE, gates_NE, mask_N, self.top_k).items():
            self.sow("aux", name, value)
        return weights_NK, idx_NK


class MoEFFN(nn.Module):
    """The FFN of a decoder layer as a mixture of `config.moe.num_experts` SwiGLU experts."""
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, segment_ids_BT):
        c, spec = self.config, self.config.moe
        B, T, D = x_BTD.shape
        E, M = spec.num_experts, c.intermediate_size
        x_ND = x_BTD.reshape(B * T, D)
        if spec.router_jitter and not self.deterministic:     # Mixtral: the jittered input feeds router and experts
            eps = spec.router_jitter
            x_ND = x_ND * jax.random.uniform(self.make_rng("dropout"), x_ND.shape, jnp.float32, 1 - eps,
                                             1 + eps).astype(x_ND.dtype)
        mask_N = (segment_ids_BT > 0).astype(jnp.float32).reshape(-1)
        weights_NK, idx_NK = Router(E, spec.top_k, self.param_dtype, name="router")(x_ND, mask_N)
        init = nn.initializers.normal(0.02)
        gate = self.param("gate_proj", init, (E, D, M), self.param_dtype).astype(self.dtype)
        up = self.param("up_proj", init, (E, D, M), self.param_dtype).astype(self.dtype)
        down = self.param("down_proj", init, (E, M, D), self.param_dtype).astype(self.dtype)
        y_ND = IMPLS[resolve_impl(spec.impl)](x_ND.astype(self.dtype), gate, up, down, weights_NK, idx_NK)
        return y_ND.astype(self.dtype).reshape(B, T, D)
