"""The linear layer of every projection: base kernel, optionally LoRA, optionally LoRA-MoE.

One expert without router is plain LoRA:  y = x W + dropout(x) A B s.
Several experts with a router is mergoo's LoRA-MoE: the base is always applied, a bias-free router on the
layer's OWN input width (so down_proj routes too) picks the top-k experts, softmax over the k selected
logits, y = x W + sum_{i in top-k} g_i * dropout(x) A_i B_i s_i.
The experts' A and B are concatenated along the rank axis (`lora_a` [in, R], `lora_b` [R, out] with
R = sum of ranks), so any number of experts costs two extra matmuls; the router's gates are spread over the
rank columns by a constant [E, R] matrix, so there are no per-token gathers and no loop over experts.

Auxiliary outputs are sown into the `aux` collection (per layer when scanned): the Switch/BTX load-balancing
term N * sum_i f_i p_i, the router z-loss, and the fraction of tokens routed to each expert.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from btx_jax.config import AdapterSpec


def kaiming_uniform_a_sqrt5(key, shape, dtype=jnp.float32):
    """PEFT/torch nn.Linear default for lora_A: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def gaussian_per_expert(ranks: tuple[int, ...]):
    """PEFT's "gaussian" lora_A init, normal(std=1/r), with each expert's own rank r on its columns."""
    std_R = jnp.asarray(np.concatenate([np.full(r, 1.0 / r, np.float32) for r in ranks]))

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.normal(key, shape, jnp.float32) * std_R).astype(dtype)
    return init


def expert_columns(spec: AdapterSpec, target: str) -> tuple[np.ndarray, np.ndarray]:
    """([E, R] one-hot of which expert owns each rank column, [R] per-column LoRA scale)."""
    ranks = spec.ranks(target)
    owner_ER = np.zeros((spec.num_choices, sum(ranks)), np.float32)
    scale_R = np.zeros((sum(ranks),), np.float32)
    start = 0
    for i, (r, e) in enumerate(zip(ranks, spec.experts)):
        owner_ER[i, start:start + r] = 1.0
        scale_R[start:start + r] = e.scale_for(target)
        start += r
    return owner_ER, scale_R


def _top_k_probs(logits_BTE: jnp.ndarray, top_k: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(dense [.., E] softmax over the k largest logits, zero elsewhere; [.., k, E] one-hot of the picks;
    [.., k] expert indices), fp32.  The picks are made on stopped logits and the softmax runs on the masked
    logits, so the gradient needs no scatter (top_k's own gradient is one, which the TPU cost model cannot
    price); values and gradients are those of the softmax over top_k's values."""
    _, idx_BTK = jax.lax.top_k(jax.lax.stop_gradient(logits_BTE), top_k)
    onehot_BTKE = jax.nn.one_hot(idx_BTK, logits_BTE.shape[-1], dtype=jnp.float32)
    picked_BTE = jnp.sum(onehot_BTKE, axis=-2) > 0
    probs_BTE = jax.nn.softmax(jnp.where(picked_BTE, logits_BTE.astype(jnp.float32), -jnp.inf), axis=-1)
    return probs_BTE, onehot_BTKE, idx_BTK


def top_k_softmax(logits_BTE: jnp.ndarray, top_k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(weights [.., k], expert indices [.., k]): softmax over the k largest logits (fp32).  Equal to Mixtral's
    softmax over all logits, top-k, renormalised: exp(l_i) / sum_{j in top-k} exp(l_j) either way."""
    probs_BTE, onehot_BTKE, idx_BTK = _top_k_probs(logits_BTE, top_k)
    return jnp.einsum("...ke,...e->...k", onehot_BTKE, probs_BTE), idx_BTK


def dense_gates(weights_BTK: jnp.ndarray, idx_BTK: jnp.ndarray, num_experts: int) -> jnp.ndarray:
    """[.., E] gates: the top-k weights at their experts, zero elsewhere."""
    return jnp.sum(jax.nn.one_hot(idx_BTK, num_experts, dtype=jnp.float32) * weights_BTK[..., None], axis=-2)


def route(logits_BTE: jnp.ndarray, top_k: int) -> jnp.ndarray:
    """Dense [.., E] gates: softmax over the top-k logits, zero elsewhere (fp32)."""
    return _top_k_probs(logits_BTE, top_k)[0]


def router_aux(logits_BTE: jnp.ndarray, gates_BTE: jnp.ndarray, mask_BT: jnp.ndarray, top_k: int) -> dict:
    """Load balancing N * sum_i f_i p_i (f_i: share of routed token-slots, p_i: mean router probability),
    z-loss mean(logsumexp^2), f_i itself (`expert_frac`) and the mean gate weight per expert
    (`expert_weight`, sums to 1: how much of the LoRA mixture each expert supplies), over masked tokens."""
    num_experts = logits_BTE.shape[-1]
    tokens = tuple(range(logits_BTE.ndim - 1))       # every axis but the experts' ([B, T] or flattened)
    m = mask_BT[..., None].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(m), 1.0)
    frac_E = jnp.sum((gates_BTE > 0) * m, axis=tokens) / (denom * top_k)
    prob_E = jnp.sum(jax.nn.softmax(logits_BTE, axis=-1) * m, axis=tokens) / denom
    z = jnp.sum(jax.nn.logsumexp(logits_BTE, axis=-1) ** 2 * mask_BT) / denom
    weight_E = jnp.sum(gates_BTE * m, axis=tokens) / denom
    return {"lb_loss": num_experts * jnp.sum(frac_E * prob_E), "z_loss": z, "expert_frac": frac_E,
            "expert_weight": weight_E}


class Linear(nn.Module):
    """Projection `target` (q_proj ... down_proj) with kernel [in, out] and the adapter's LoRA experts."""
    features: int
    target: str
    adapter: AdapterSpec | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTI: jnp.ndarray, routed: jnp.ndarray | float = 1.0,
                 token_mask_BT: jnp.ndarray | None = None) -> jnp.ndarray:
        # Tokens are flattened to N = B*T rows: the backward pass then contracts one axis, which lets XLA:CPU
        # skip big transposing copies of the output gradient (the LoRA B gradient ran 3x slower without it).
        in_dim = x_BTI.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(0.02), (in_dim, self.features), self.param_dtype)
        x_NI = x_BTI.reshape(-1, in_dim).astype(self.dtype)
        out_shape = (*x_BTI.shape[:-1], self.features)
        y_NO = x_NI @ kernel.astype(self.dtype)
        spec = self.adapter
        if spec is None or self.target not in spec.targets:
            return y_NO.reshape(out_shape)
        owner_ER, scale_R = expert_columns(spec, self.target)
        init_a = kaiming_uniform_a_sqrt5 if spec.init == "kaiming" else gaussian_per_expert(spec.ranks(self.target))
        lora_a = self.param("lora_a", init_a, (in_dim, owner_ER.shape[1]), self.param_dtype)
        lora_b = self.param("lora_b", nn.initializers.zeros, (owner_ER.shape[1], self.features), self.param_dtype)
        col_NR = jnp.asarray(scale_R)
        if spec.router:
            mask_N = None if token_mask_BT is None else token_mask_BT.reshape(-1)
            col_NR = col_NR * (self._gates(x_BTI.reshape(-1, in_dim), mask_N, routed) @ jnp.asarray(owner_ER))
        x_lora = nn.Dropout(spec.dropout, deterministic=self.deterministic)(x_NI) if spec.dropout else x_NI
        h_NR = (x_lora @ lora_a.astype(self.dtype)).astype(jnp.float32) * col_NR
        delta_NO = h_NR.astype(self.dtype) @ lora_b.astype(self.dtype)
        return (y_NO + (delta_NO * jnp.asarray(routed, self.dtype)).astype(y_NO.dtype)).reshape(out_shape)

    def _gates(self, x_NI, mask_N, routed) -> jnp.ndarray:
        spec = self.adapter
        router = self.param("router", nn.initializers.normal(0.02), (x_NI.shape[-1], spec.num_choices),
                            self.param_dtype)
        x32 = x_NI.astype(jnp.float32)
        if spec.router_jitter and not self.deterministic:
            eps = spec.router_jitter
            x32 = x32 * jax.random.uniform(self.make_rng("dropout"), x32.shape, jnp.float32, 1 - eps, 1 + eps)
        logits_NE = x32 @ router.astype(jnp.float32)
        gates_NE = route(logits_NE, spec.top_k)
        mask = jnp.ones(x_NI.shape[:-1], jnp.float32) if mask_N is None else mask_N
        for name, value in router_aux(logits_NE, gates_NE, mask, spec.top_k).items():
            self.sow("aux", name, value * jnp.asarray(routed, jnp.float32))
        return gates_NE


def summarize_aux(aux: dict, config) -> dict:
    """Collapse the sown `aux` tree into scalars + routing statistics (LoRA-MoE or FFN-MoE `config`).

    Returns lb_loss and z_loss averaged over every routed (layer, projection) or, for an FFN-MoE, every layer's
    router, and `expert_frac` / `expert_weight`: {target: [layers, experts]} share of routed token-slots / mean
    gate weight per expert (zeros on unrouted layers; the FFN-MoE's target is "router")."""
    aux = aux.get("layers", aux)          # accept the whole sown tree or its scanned "layers" subtree
    n = max(float(routed_count(config)), 1.0)
    lb = z = 0.0
    frac, weight = {}, {}
    for _, block in aux.items():          # attn / mlp / moe
        for target, stats in block.items():
            lb = lb + jnp.sum(stats["lb_loss"][0])
            z = z + jnp.sum(stats["z_loss"][0])
            frac[target] = stats["expert_frac"][0]
            weight[target] = stats["expert_weight"][0]
    return {"lb_loss": lb / n, "z_loss": z / n, "expert_frac": frac, "expert_weight": weight}


def routed_count(config) -> int:
    """Number of routers whose aux losses are averaged: routed layers x targets (LoRA-MoE), layers (FFN-MoE),
    0 for a model without routers."""
    if config.moe is not None:
        return config.num_layers
    spec = config.adapter
    if spec is None or not spec.router:
        return 0
    layers = config.num_layers if spec.router_layers is None else len(spec.router_layers)
    return layers * len(spec.targets)
