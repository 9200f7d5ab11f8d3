"""LoRA / LoRA-MoE Linear (btx_jax/model/lora.py): formula, PEFT init, routing, aux losses, seed expert,
down_proj routing gradients.  Also home of `random_lora`, the helper the compose / mergoo tests use."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btx_jax import param_paths
from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
from btx_jax.model import init_params
from btx_jax.model.lora import Linear, route, router_aux

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8)


def random_lora(pre, *, rank=4, alpha=8.0, targets=("gate_proj", "up_proj"), seed=0, rslora=False,
                rank_pattern=(), alpha_pattern=(), scale=0.3):
    """A plain-LoRA Pretrained on `pre`'s base weights with random non-zero A and B."""
    config = pre.config.replace(adapter=AdapterSpec(
        targets=tuple(targets), experts=(ExpertSpec(rank, alpha, rslora, tuple(rank_pattern), tuple(alpha_pattern)),)))
    shapes = param_paths.flatten(jax.eval_shape(lambda: init_params(config)))
    rng = np.random.default_rng(seed)
    flat = pre.flat_numpy()
    for path, sds in shapes.items():
        if path not in flat:
            flat[path] = (rng.standard_normal(sds.shape) * scale).astype(np.float32)
    from btx_jax.pretrained import Pretrained
    return Pretrained.from_arrays(config, flat)


def _apply(spec, x, params=None, features=6, target="gate_proj", rng=0, deterministic=True, rngs=None):
    layer = Linear(features, target, spec, deterministic=deterministic)
    if params is None:
        params = layer.init(jax.random.PRNGKey(rng), x)["params"]
    out, state = layer.apply({"params": params}, x, mutable=["aux"], rngs=rngs)
    return params, np.asarray(out), state.get("aux", {})


def _randomize(params, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(v.shape) * scale, jnp.float32) for k, v in params.items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_plain_lora_formula(rslora):
    spec = AdapterSpec(targets=("gate_proj",), experts=(ExpertSpec(4, 12.0, rslora),))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5)), jnp.float32)
    params, _, _ = _apply(spec, x)
    params = _randomize(params)
    _, y, aux = _apply(spec, x, params)
    s = 12.0 / (math.sqrt(4) if rslora else 4)
    p = {k: np.asarray(v) for k, v in params.items()}
    want = np.asarray(x) @ p["kernel"] + (np.asarray(x) @ p["lora_a"]) @ p["lora_b"] * s
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert aux == {}


def test_rank_and_alpha_pattern_scale():
    e = ExpertSpec(8, 16.0, rank_pattern=(("up_proj", 2),), alpha_pattern=(("up_proj", 6.0),))
    assert (e.rank_for("gate_proj"), e.scale_for("gate_proj")) == (8, 2.0)
    assert (e.rank_for("up_proj"), e.scale_for("up_proj")) == (2, 3.0)
    assert ExpertSpec(16, 8.0, rslora=True).scale_for("q_proj") == 2.0


def test_peft_init_kaiming_and_gaussian():
    x = jnp.zeros((1, 1, 400))
    spec = AdapterSpec(targets=("gate_proj",), experts=(ExpertSpec(64, 8.0),))
    params, y, _ = _apply(spec, x, features=3)
    a = np.asarray(params["lora_a"])
    bound = 1 / math.sqrt(400)                         # kaiming_uniform(a=sqrt(5)) on fan_in=400
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert not np.asarray(params["lora_b"]).any()
    # gaussian: normal(std=1/r) with each expert's own rank
    spec = AdapterSpec(targets=("gate_proj",), experts=(ExpertSpec(4, 8.0), ExpertSpec(64, 8.0)), router=True,
                       top_k=1, init="gaussian")
    params, _, _ = _apply(spec, x, features=3)
    a = np.asarray(params["lora_a"])
    assert abs(a[:, :4].std() - 1 / 4) < 0.02 and abs(a[:, 4:].std() - 1 / 64) < 0.002


def test_dropout_only_on_lora_path():
    spec = AdapterSpec(targets=("gate_proj",), experts=(ExpertSpec(4, 8.0),), dropout=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 16)), jnp.float32)
    params, _, _ = _apply(spec, x)
    p0 = {**params, "lora_b": jnp.zeros_like(params["lora_b"])}
    _, y_det, _ = _apply(spec, x, p0)
    _, y_drop, _ = _apply(spec, x, p0, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(y_drop, y_det, atol=1e-6)    # B = 0: base path untouched by dropout
    params = _randomize(params)
    _, y_det, _ = _apply(spec, x, params)
    _, y_drop, _ = _apply(spec, x, params, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.abs(y_drop - y_det).max() > 1e-3


def test_route_topk_softmax_and_ties():
    logits = jnp.asarray([[[1.0, 3.0, 2.0, -1.0]]])
    g = np.asarray(route(logits, 2))[0, 0]
    e = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
    np.testing.assert_allclose(g, [0, e[0], e[1], 0], atol=1e-6)
    # zero router: ties go to the lowest indices, equal weights (documented in btx_jax/mix/compose.py)
    np.testing.assert_allclose(np.asarray(route(jnp.zeros((1, 1, 3)), 2))[0, 0], [0.5, 0.5, 0.0])


def _moe_spec(**kw):
    experts = (ExpertSpec(2, 4.0), ExpertSpec(3, 6.0, rslora=True), ExpertSpec(4, 2.0))
    return AdapterSpec(**{**dict(targets=("gate_proj",), experts=experts, router=True, top_k=3), **kw})


def test_topk_all_equals_dense_softmax_mixture():
    spec = _moe_spec(top_k=3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7)), jnp.float32)
    params, _, _ = _apply(spec, x)
    params = _randomize(params)
    _, y, _ = _apply(spec, x, params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xn = np.asarray(x, np.float64)
    logits = xn @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = xn @ p["kernel"]
    start = 0
    for i, e in enumerate(spec.experts):
        a, b = p["lora_a"][:, start:start + e.rank], p["lora_b"][start:start + e.rank]
        want = want + probs[..., i:i + 1] * (xn @ a @ b) * e.scale_for("gate_proj")
        start += e.rank
    np.testing.assert_allclose(y, want, atol=1e-4)


def test_topk_selects_and_renormalises():
    spec = _moe_spec(top_k=1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 7)), jnp.float32)
    params, _, _ = _apply(spec, x)
    params = _randomize(params)
    _, y, _ = _apply(spec, x, params)
    p = {k: np.asarray(v) for k, v in params.items()}
    pick = (np.asarray(x) @ p["router"]).argmax(-1)
    offsets = np.cumsum([0, 2, 3, 4])
    for t in range(6):
        i = pick[0, t]
        e = spec.experts[i]
        a, b = p["lora_a"][:, offsets[i]:offsets[i + 1]], p["lora_b"][offsets[i]:offsets[i + 1]]
        want = np.asarray(x)[0, t] @ p["kernel"] + np.asarray(x)[0, t] @ a @ b * e.scale_for("gate_proj")
        np.testing.assert_allclose(y[0, t], want, atol=1e-4)


def test_seed_expert_contributes_nothing():
    spec = AdapterSpec(targets=("gate_proj",), experts=(ExpertSpec(2, 4.0), ExpertSpec(2, 4.0)), router=True,
                       top_k=1, seed_expert=True)
    x = jnp.asarray(np.abs(np.random.default_rng(0).standard_normal((1, 4, 5))), jnp.float32)   # x > 0
    params, _, _ = _apply(spec, x)
    params = _randomize(params)
    router = np.zeros((5, 3), np.float32)
    router[:, 2] = 1.0                                  # seed (last choice) wins for every positive x
    params = {**params, "router": jnp.asarray(router)}
    _, y, aux = _apply(spec, x, params)
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(params["kernel"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["expert_frac"][0]), [0, 0, 1])


def test_router_aux_hand_computed():
    logits = jnp.asarray([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])    # 1 batch, 2 tokens, 3 experts
    gates = route(logits, 1)
    aux = router_aux(logits, gates, jnp.ones((1, 2)), 1)
    p = np.exp(np.asarray(logits[0], np.float64))
    z = np.log(p.sum(-1))
    p /= p.sum(-1, keepdims=True)
    f = np.array([0.5, 0.5, 0.0])                      # token 0 -> expert 0, token 1 -> expert 1
    np.testing.assert_allclose(np.asarray(aux["expert_frac"]), f)
    np.testing.assert_allclose(float(aux["lb_loss"]), 3 * np.sum(f * p.mean(0)), rtol=1e-6)
    np.testing.assert_allclose(float(aux["z_loss"]), np.mean(z ** 2), rtol=1e-6)
    # masked token ignored; top-2 shares are divided by k so they sum to 1
    aux = router_aux(logits, route(logits, 2), jnp.asarray([[1.0, 0.0]]), 2)
    np.testing.assert_allclose(np.asarray(aux["expert_frac"]), [0.5, 0.5, 0.0])   # tie on token 0 -> lower index
    # perfectly balanced uniform router: lb = 1
    aux = router_aux(jnp.zeros((1, 3, 3)), jnp.full((1, 3, 3), 1 / 3), jnp.ones((1, 3)), 3)
    np.testing.assert_allclose(float(aux["lb_loss"]), 1.0, rtol=1e-6)


def test_down_proj_routing_runs_and_gradients_flow():
    from btx_jax.model import Llama, summarize_aux
    spec = AdapterSpec(targets=("gate_proj", "up_proj", "down_proj"),
                       experts=(ExpertSpec(2, 4.0), ExpertSpec(3, 3.0)), router=True, top_k=1)
    config = TINY.replace(adapter=spec)
    params = init_params(config, jax.random.PRNGKey(0))
    flat = param_paths.flatten(params)
    assert flat["layers/mlp/down_proj/router"].shape == (2, 48, 2)        # on intermediate width
    rng = np.random.default_rng(0)
    flat = {k: (jnp.asarray(rng.standard_normal(v.shape) * 0.1, jnp.float32) if k.endswith("lora_b") else v)
            for k, v in flat.items()}
    params = param_paths.unflatten(flat)
    ids = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    model = Llama(config)

    def loss(p):
        logits, state = model.apply({"params": p}, ids, mutable=["aux"])
        aux = summarize_aux(state["aux"], config)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.01 * aux["lb_loss"]

    grads = param_paths.flatten(jax.grad(loss)(params))
    for leaf in ("router", "lora_a", "lora_b"):
        g = np.asarray(grads[f"layers/mlp/down_proj/{leaf}"])
        assert np.abs(g).max() > 0, leaf
        assert np.isfinite(g).all()
