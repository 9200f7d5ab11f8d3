"""Blocked custom-VJP causal attention against jax.nn.dot_product_attention (values and gradients) and the
whole model against transformers with several query blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import btx_jax
from btx_jax.model.attention import causal_attention
from conftest import hf_logits, random_ids


def _inputs(B, T, N, K, H, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, w = (jax.random.normal(kk, (B, T, n, H)) for kk, n in zip(ks, (N, K, K, N)))
    rng = np.random.default_rng(seed)
    # packed rows: sorted segment ids 1..3 with a zero-padded tail, different per row
    seg = np.sort(rng.integers(1, 4, (B, T)), axis=1)
    seg[:, T - T // 5:] = 0
    return q, k, v, w, jnp.asarray(seg, jnp.int32)


@pytest.mark.parametrize("T,block,N,K", [(100, 32, 8, 2), (64, 64, 4, 4), (50, 128, 4, 1), (96, 16, 6, 3)])
def test_blocked_matches_reference_values_and_grads(T, block, N, K):
    q, k, v, w, seg = _inputs(2, T, N, K, 16)

    def loss(impl):
        return lambda q, k, v: jnp.sum(causal_attention(q, k, v, seg, impl, block) * w)

    ref_val, ref_grads = jax.value_and_grad(loss("xla"), (0, 1, 2))(q, k, v)
    val, grads = jax.jit(jax.value_and_grad(loss("blocked"), (0, 1, 2)))(q, k, v)
    assert abs(float(val - ref_val)) <= 1e-4 * abs(float(ref_val)) + 1e-3
    for name, g, r in zip("qkv", grads, ref_grads):
        err = float(jnp.max(jnp.abs(g - r)))
        assert err <= 2e-5 * float(jnp.max(jnp.abs(r))) + 1e-5, (name, err)
    out = causal_attention(q, k, v, seg, "blocked", block)
    ref = causal_attention(q, k, v, seg, "xla", block)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5


def test_blocked_bf16_close_to_fp32():
    q, k, v, w, seg = _inputs(2, 80, 4, 2, 32, seed=3)
    ref = causal_attention(q, k, v, seg, "xla")
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = causal_attention(*bf, seg, "blocked", 32)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) <= 3e-2
    g = jax.grad(lambda q: jnp.sum(causal_attention(q, *bf[1:], seg, "blocked", 32).astype(jnp.float32) * w))(bf[0])
    g_ref = jax.grad(lambda q: jnp.sum(causal_attention(q, k, v, seg, "xla") * w))(q)
    assert g.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - g_ref))) <= 3e-2 * float(jnp.max(jnp.abs(g_ref)))


def test_unknown_implementation_is_refused():
    q, k, v, _, seg = _inputs(1, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="flash"):
        causal_attention(q, k, v, seg, "flash")


def test_blocked_model_logits_match_transformers(hf_llama):
    directory = hf_llama(num_key_value_heads=2, head_dim=24)
    ids = random_ids(2, 40, seed=5)
    pre = btx_jax.load_pretrained(directory)
    model = pre.model(attention="blocked", attention_block=16)      # 3 query blocks, the last one ragged
    ours = np.asarray(model.apply({"params": pre.params}, jnp.asarray(ids)))
    diff = float(np.max(np.abs(ours - hf_logits(directory, ids))))
    print(f"blocked attention, 3 blocks: fp32 max|diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-4
