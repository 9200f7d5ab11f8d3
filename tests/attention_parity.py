"""Shared by the Pallas attention kernel tests (test_splash.py, test_gpu_attention.py): packed inputs and the
check that a kernel's values and gradients agree with the masked XLA reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax.model.attention import causal_attention

T = 128          # one 128-row block: the Pallas interpreter is slow


def inputs(B=1, N=2, K=1, H=32, dtype=jnp.float32, seed=0, segments=4):
    """q, k, v, an output weight w (all [B, T, heads, H]) and packed segment ids with a zero-padded tail."""
    r = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(r.normal(size=(B, T, n, H)), dtype) for n in (N, K, K, N))
    seg = np.sort(r.integers(1, segments, (B, T)), axis=1)
    seg[:, T - 20:] = 0
    return q, k, v, w, jnp.asarray(seg, jnp.int32)


def value_and_grads(fn, q, k, v, w):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), (0, 1, 2))(q, k, v)


def assert_matches_reference(kernel, dtype, tol, **shape):
    """`kernel(q, k, v, seg)` in `dtype` against the fp32 masked reference: output dtype and values, the loss and
    the gradients of q, k, v (in `dtype`, within tol of the largest reference gradient)."""
    q, k, v, w, seg = inputs(dtype=dtype, **shape)
    ref = lambda q, k, v: causal_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           seg, "xla")
    got = lambda q, k, v: kernel(q, k, v, seg)
    out = got(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref(q, k, v)), atol=tol, rtol=tol)
    val, grads = value_and_grads(got, q, k, v, w)
    ref_val, ref_grads = value_and_grads(ref, q, k, v, w)
    np.testing.assert_allclose(val, ref_val, rtol=tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        scale = float(jnp.max(jnp.abs(r)))
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) <= tol * scale + tol
