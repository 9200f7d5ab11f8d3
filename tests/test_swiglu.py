"""btx_jax/model/swiglu.py: values and gradients equal plain autodiff of silu(gate) * up, and the backward
pass keeps only gate and up (autodiff also keeps sigmoid(gate) and silu(gate))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btx_jax.model.swiglu import swiglu


def plain(gate, up, dtype):
    return jax.nn.silu(gate.astype(jnp.float32)).astype(dtype) * up


def inputs(dtype):
    kg, ku = jax.random.split(jax.random.key(0))
    return (4 * jax.random.normal(kg, (3, 5, 64))).astype(dtype), jax.random.normal(ku, (3, 5, 64)).astype(dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_match_autodiff(dtype, tol):
    gate, up = inputs(dtype)
    dh = jax.random.normal(jax.random.key(1), gate.shape).astype(dtype)
    ours, vjp_ours = jax.vjp(lambda g, u: swiglu(g, u, dtype), gate, up)
    ref, vjp_ref = jax.vjp(lambda g, u: plain(g, u, dtype), gate, up)
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
    for a, b in zip(vjp_ours(dh), vjp_ref(dh)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_mixed_dtypes_promote_like_the_plain_product():
    """The FFN-MoE multiplies a bf16 silu by an fp32 up projection: the result and up's gradient stay fp32."""
    gate, up = inputs(jnp.bfloat16)[0], inputs(jnp.float32)[1]
    out, vjp = jax.vjp(lambda g, u: swiglu(g, u, jnp.bfloat16), gate, up)
    assert out.dtype == plain(gate, up, jnp.bfloat16).dtype == jnp.float32
    d_gate, d_up = vjp(jnp.ones_like(out))
    assert (d_gate.dtype, d_up.dtype) == (jnp.bfloat16, jnp.float32)


def test_backward_keeps_only_gate_and_up():
    gate, up = inputs(jnp.float32)
    saved = lambda f: sum(x.size for x in jax.tree_util.tree_leaves(jax.vjp(f, gate, up)[1]))  # noqa: E731
    assert saved(lambda g, u: swiglu(g, u, jnp.float32)) == 2 * gate.size
    assert saved(lambda g, u: plain(g, u, jnp.float32)) > 2 * gate.size
