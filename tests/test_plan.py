"""scripts/plan.py: the abstract plan agrees with the memory of the real state on 8 virtual devices, and its
FLOPs grow ~linearly with the batch.  (conftest.py sets XLA_FLAGS to 8 host devices.)"""
from __future__ import annotations

from pathlib import Path

import jax
import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)


@pytest.fixture(scope="module")
def plan_mod():
    return load_script("plan")


def small_cfg():
    from btx_jax.train.trainer import resolved
    from configs import expert
    c = expert.get_config("synthetic")
    c.model.arch = ARCH
    c.train.update(global_batch_size=8, seq_len=32)
    return resolved(c)


def real_state_bytes_on_device0(cfg) -> dict:
    """Build the state like train() does and sum the device-0 shards of each part."""
    import jax.numpy as jnp
    from btx_jax.train.trainer import initial_state, wire
    t = cfg["train"]
    state, _ = initial_state(wire(cfg), 0)
    dev0 = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
                   if s.device == dev0)
    return {"params": on_dev0(state["trainable"]) + on_dev0(state["frozen"]),
            "optimizer": on_dev0(state["opt_state"]), "frozen_dtype": jnp.dtype(t["frozen_dtype"])}


def test_plan_bytes_match_real_state_shards(plan_mod):
    assert jax.device_count() == 8
    cfg = small_cfg()
    planned = plan_mod.plan(cfg, phase="expert")
    real = real_state_bytes_on_device0(cfg)
    assert planned["devices"] == 8
    got = planned["bytes"]["params"] + planned["bytes"]["optimizer"]
    want = real["params"] + real["optimizer"]
    assert abs(got - want) <= 0.03 * want, (planned["bytes"], real)
    assert abs(planned["bytes"]["optimizer"] - real["optimizer"]) <= 0.03 * real["optimizer"]
    # the compiled step's arguments are the state + batch: the same bytes, give or take the batch
    assert planned["bytes"]["argument"] >= want
    assert planned["bytes"]["temp"] > 0 and planned["bytes"]["peak"] >= planned["bytes"]["argument"]


def test_planned_flops_positive_and_linear_in_batch(plan_mod):
    cfg = small_cfg()
    f8 = plan_mod.plan(cfg, phase="expert", batch=8)["flops_global"]
    f16 = plan_mod.plan(cfg, phase="expert", batch=16)["flops_global"]
    assert f8 > 0
    assert 1.8 <= f16 / f8 <= 2.05, (f8, f16)


def test_parse_bytes(plan_mod):
    assert plan_mod.parse_bytes("80GB") == 80 * 10**9
    assert plan_mod.parse_bytes("141GiB") == 141 * 2**30
