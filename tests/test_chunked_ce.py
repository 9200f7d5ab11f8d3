"""btx_jax/model/chunked_ce.py: the chunked lm_head + cross-entropy equals full fp32 logits +
optax.softmax_cross_entropy_with_integer_labels (values and gradients, 1e-5 in fp32), with loss masks, a
trainable or frozen head, and inside the router phase's train-step loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
from btx_jax.model import Llama, init_params
from btx_jax.model.chunked_ce import chunked_cross_entropy
from btx_jax import param_paths
from btx_jax.train import phases
from btx_jax.train.step import ce_sum


def plain(h_BTD, head_DV, targets_BT, mask_BT):
    logits = jnp.einsum("btd,dv->btv", h_BTD, head_DV, preferred_element_type=jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT) * mask_BT)


def inputs(B=3, T=24, D=16, V=50, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.normal(size=(B, T, D)), dtype)
    w = jnp.asarray(r.normal(size=(D, V)) * 0.5, dtype)
    t = jnp.asarray(r.integers(0, V, size=(B, T)), jnp.int32)
    m = jnp.asarray(r.random((B, T)) > 0.3, jnp.float32)
    return h, w, t, m


@pytest.mark.parametrize("chunk", [1, 8, 24, 10])     # 10 does not divide 24: falls back to 8
def test_value_and_gradients_match_plain_fp32(chunk):
    h, w, t, m = inputs()
    want, (dh_want, dw_want) = jax.value_and_grad(plain, argnums=(0, 1))(h, w, t, m)
    got, (dh, dw) = jax.jit(jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, t, m, chunk),
                                               argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dh, dh_want, atol=1e-5)
    np.testing.assert_allclose(dw, dw_want, atol=1e-5)
    assert float(jnp.abs(dh[m == 0]).max()) == 0.0          # masked tokens get no gradient


def test_frozen_head_gradient_to_hidden_only_and_bf16():
    h, w, t, m = inputs(dtype=jnp.bfloat16)
    dh_want = jax.grad(plain)(h, w, t, m)
    dh = jax.jit(jax.grad(lambda h: chunked_cross_entropy(h, w, t, m, 8)))(h)
    assert dh.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh_want, np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(chunked_cross_entropy(h, w, t, m, 8), plain(h, w, t, m), rtol=1e-2)


def test_router_phase_loss_and_lm_head_gradient_match_plain_path():
    spec = AdapterSpec(targets=("gate_proj", "up_proj", "down_proj"), experts=(ExpertSpec(4, 8),) * 3, router=True)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, adapter=spec)
    params = init_params(config, jax.random.PRNGKey(0))
    trainable, frozen = (param_paths.unflatten(t) for t in
                         phases.split(param_paths.flatten(params), phases.PHASES["router"]))
    assert "router" in str(jax.tree_util.tree_structure(trainable))
    model = Llama(config)
    r = np.random.default_rng(1)
    batch = {"inputs": jnp.asarray(r.integers(0, 96, (2, 16)), jnp.int32),
             "targets": jnp.asarray(r.integers(0, 96, (2, 16)), jnp.int32),
             "loss_mask": jnp.asarray(r.random((2, 16)) > 0.25, jnp.float32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 10 + [2] * 6], 2, 0), jnp.int32),
             "positions": jnp.asarray(np.repeat([list(range(10)) + list(range(6))], 2, 0), jnp.int32)}

    def loss(tr, chunk):
        ce, aux = ce_sum(model, phases.merge(tr, frozen), batch, loss_chunk=chunk)
        return ce + 0.01 * aux["lb_loss"]

    want, g_want = jax.value_and_grad(loss)(trainable, 0)
    got, g = jax.value_and_grad(loss)(trainable, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "lm_head" in g and float(jnp.abs(g["lm_head"]).max()) > 0
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("layout", ["batch", "vocab"])
def test_sharded_layouts_match_plain_on_8_devices(layout):
    """On an 8-device fsdp mesh both loss layouts give the plain loss and its hidden-state and lm_head
    gradients (the router/SFT case, where the head trains)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from btx_jax import mesh as mesh_lib
    from btx_jax.train.step import _head_spec, _vocab_axes, resolve_layout

    mesh = mesh_lib.make_mesh({"fsdp": -1})
    h, w, t, m = inputs(B=8, T=16, D=16, V=64)
    want, (dh_want, dw_want) = jax.value_and_grad(plain, argnums=(0, 1))(h, w, t, m)
    assert resolve_layout(layout, 8 * 16, w.shape, mesh) == layout
    named = lambda *spec: NamedSharding(mesh, P(*spec))
    shardings = ((named(), named(None, _vocab_axes(w.shape, mesh, mesh_lib.DEFAULT_RULES))) if layout == "vocab"
                 else None)
    h_s = jax.device_put(h, named("fsdp"))                     # as the model leaves them: batch-sharded
    w_s = jax.device_put(w, named("fsdp", None))               # as stored: fsdp on the embed axis

    def loss(h, w):
        if shardings is None:
            h = jax.lax.with_sharding_constraint(h, named("fsdp", None))
            w = jax.lax.with_sharding_constraint(w, named(*_head_spec(w.shape, mesh, mesh_lib.DEFAULT_RULES)))
        return chunked_cross_entropy(h, w, t, m, 4, shardings)

    got, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h_s, w_s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dh, dh_want, atol=1e-5)
    np.testing.assert_allclose(dw, dw_want, atol=1e-5)


def test_auto_layout_rule_and_vocab_parallel_memory():
    """auto = vocab parallel where it moves fewer bytes (3 B T < 2 V), and there the compiled loss holds less
    per device than the batch layout (no gathered [D, V] head)."""
    from btx_jax import mesh as mesh_lib
    from btx_jax.train.step import resolve_layout

    mesh = mesh_lib.make_mesh({"fsdp": -1})
    assert resolve_layout("auto", 8 * 64, (1024, 32000), mesh) == "vocab"
    assert resolve_layout("auto", 32 * 4096, (4096, 32000), mesh) == "batch"       # the seed's 7B batch
    assert resolve_layout("vocab", 8, (16, 60), mesh) == "batch"                  # 60 not divisible by 8
    assert resolve_layout("batch", 8, (16, 64), mesh) == "batch"

    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=4, head_dim=16)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    shardings = mesh_lib.param_shardings(params, mesh)
    params = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                                    shardings)
    spec = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=mesh_lib.batch_sharding(mesh))
    batch = {k: spec for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=mesh_lib.batch_sharding(mesh))
    temp = {}
    for layout in ("batch", "vocab"):
        fn = jax.jit(jax.grad(lambda p, b: ce_sum(Llama(config), p, b, loss_chunk=16, mesh=mesh,
                                                  loss_layout=layout)[0]))
        temp[layout] = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    head_f32 = 64 * 8192 * 4
    assert temp["vocab"] < temp["batch"] - head_f32 // 2, temp
