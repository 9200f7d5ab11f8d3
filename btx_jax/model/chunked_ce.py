"""lm_head + token cross-entropy over chunks of sequence positions, without a [tokens, vocab] fp32 buffer.

`chunked_cross_entropy(h_BTD, head_DV, targets_BT, mask_BT, chunk)` returns the masked sum of token
cross-entropies, the same value as projecting every hidden state to fp32 logits and calling
`optax.softmax_cross_entropy_with_integer_labels`.  It scans over T/chunk slices of the sequence (all rows
of the batch at once, so a batch-sharded input stays batch-sharded): the forward keeps only the per-token
log-sum-exp; the backward (a custom VJP) recomputes each slice's logits and forms the softmax gradient there.
The live logits buffer is [B, chunk, V] instead of [B, T, V], in both passes.

`layout` (optional) is a pair of shardings (one slice of hidden states [B, chunk, D], the head [D, V]) that
every slice is computed in, forward and backward: btx_jax/train/step.py picks batch-sharded slices with a
gathered head, or (vocab parallel) gathered slices with a vocab-sharded head, where the head would be the
bigger thing to gather.

Gradients go to the hidden states and to the head (the router and SFT phases train lm_head).  The head's
gradient is only computed when the head is being differentiated (`symbolic_zeros`): a frozen head (the
expert phase) costs no weight-gradient matmul.  Matmuls run in the inputs' dtype with fp32 accumulation;
softmax and log-sum-exp are fp32.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 512       # sequence positions per slice: [local batch, 512, vocab] fp32 live at once


def _slices(x, chunk: int):
    """[B, T, ...] -> [T/chunk, B, chunk, ...] (the scan axis first)."""
    B, T = x.shape[:2]
    return jnp.swapaxes(x.reshape((B, T // chunk, chunk) + x.shape[2:]), 0, 1)


def _logits(h_BCD, head_DV):
    return jnp.einsum("bcd,dv->bcv", h_BCD, head_DV.astype(h_BCD.dtype), preferred_element_type=jnp.float32)


def _constrain(x, layout, which: int):
    return x if layout is None else jax.lax.with_sharding_constraint(x, layout[which])


def _forward(h_BTD, head_DV, targets_BT, mask_BT, chunk, layout):
    head_DV = _constrain(head_DV, layout, 1)

    def body(total, xs):
        h, t, m = xs
        logits = _logits(_constrain(h, layout, 0), head_DV)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return total + jnp.sum((lse - picked) * m), lse

    total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                              (_slices(h_BTD, chunk), _slices(targets_BT, chunk), _slices(mask_BT, chunk)))
    return total, lse


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(h_BTD, head_DV, targets_BT, mask_BT, chunk, layout):
    return _forward(h_BTD, head_DV, targets_BT, mask_BT, chunk, layout)[0]


def _chunked_fwd(h, head, targets, mask, chunk, layout):
    total, lse = _forward(h.value, head.value, targets.value, mask.value, chunk, layout)
    # the pytree structure (not a value) records whether the head needs a gradient
    return total, (h.value, head.value, targets.value, mask.value, lse, () if head.perturbed else None)


def _chunked_bwd(chunk, layout, res, g):
    h_BTD, head_DV, targets_BT, mask_BT, lse_NBC, head_grad = res
    want_head = head_grad is not None
    head_DV = _constrain(head_DV, layout, 1)
    w = head_DV.astype(h_BTD.dtype)

    def body(dw_DV, xs):
        h, t, m, lse_c = xs
        h = _constrain(h, layout, 0)
        p = jnp.exp(_logits(h, head_DV) - lse_c[..., None])
        dlogits = (p - jax.nn.one_hot(t, p.shape[-1], dtype=p.dtype)) * (m * g)[..., None]
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
        if want_head:
            dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
        return dw_DV, dh

    dw0 = jnp.zeros(head_DV.shape, jnp.float32) if want_head else jnp.zeros((), jnp.float32)
    xs = (_slices(h_BTD, chunk), _slices(targets_BT, chunk), _slices(mask_BT, chunk), lse_NBC)
    dw, dh = jax.lax.scan(body, dw0, xs)
    B, T, D = h_BTD.shape
    dh_BTD = jnp.swapaxes(dh, 0, 1).reshape(B, T, D)
    return dh_BTD, (dw.astype(head_DV.dtype) if want_head else None), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def chunked_cross_entropy(h_BTD, head_DV, targets_BT, mask_BT, chunk: int = DEFAULT_CHUNK, layout=None):
    """Sum over tokens of mask * cross-entropy(h @ head, target), fp32; `chunk` positions per slice (a chunk
    that does not divide T falls back to the largest divisor of T not above it); `layout`: (slice sharding,
    head sharding) or None (left to XLA)."""
    T = h_BTD.shape[1]
    chunk = max(1, min(int(chunk), T))
    while T % chunk:
        chunk -= 1
    return _chunked(h_BTD, head_DV, targets_BT.astype(jnp.int32), mask_BT.astype(jnp.float32), chunk, layout)
