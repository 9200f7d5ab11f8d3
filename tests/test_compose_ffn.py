"""compose(..., FfnMoESpec(...)) (btx_jax/mix/compose_ffn.py): dense experts (HF dirs, btx checkpoints, PEFT LoRA dirs,
Pretrained) -> FFN-MoE; stacking order and seed expert, shared-weight averaging.  Bad input through
scripts/compose.py (one line, exit 2, nothing written): test_compose_cli.py."""
from __future__ import annotations

import numpy as np
import pytest

import btx_jax
from conftest import random_ids
from test_lora import random_lora

FFN = ("gate_proj", "up_proj", "down_proj")


def branched(seed, rng_seed: int, ffn_only: bool = True, scale: float = 0.02):
    """`seed` with its MLP kernels (and, unless ffn_only, everything else) moved a little: a trained expert."""
    rng = np.random.default_rng(rng_seed)
    flat = seed.flat_numpy()
    for k, v in flat.items():
        if not ffn_only or k.startswith("layers/mlp/"):
            flat[k] = (v + rng.standard_normal(v.shape) * scale).astype(v.dtype)
    return btx_jax.Pretrained.from_arrays(seed.config, flat)


@pytest.fixture(scope="module")
def setup(hf_llama):
    seed_dir = hf_llama()
    seed = btx_jax.load_pretrained(seed_dir)
    return seed_dir, seed, [branched(seed, 10 + i) for i in range(3)]


def test_one_expert_top1_is_that_expert(setup):
    _, seed, experts = setup
    ids = random_ids(2, 8)
    full = branched(seed, 7, ffn_only=False)
    for expert in (experts[0], full):
        moe = btx_jax.compose(seed, [expert], btx_jax.FfnMoESpec(top_k=1))
        assert moe.config.moe.num_experts == 1 and moe.config.adapter is None
        assert np.abs(moe.logits(ids) - expert.logits(ids)).max() <= 1e-5


def test_stacking_seed_expert_and_shared_weights(setup):
    _, seed, experts = setup
    moe = btx_jax.compose(seed, experts, btx_jax.FfnMoESpec(top_k=2, seed_expert=True, router_init="normal",
                                                            router_seed=3))
    flat, sflat = moe.flat_numpy(), seed.flat_numpy()
    assert moe.config.moe.num_experts == 4 and moe.config.moe.seed_expert
    for name in FFN:
        stacked = flat[f"layers/moe/{name}"]
        for e, src in enumerate([*experts, seed]):
            assert np.array_equal(stacked[:, e], src.flat_numpy()[f"layers/mlp/{name}/kernel"])
    assert flat["layers/moe/router/kernel"].shape == (2, 48, 4)
    assert 0.015 < flat["layers/moe/router/kernel"].std() < 0.025
    # FFN-only experts: the shared weights are the seed's, bit for bit
    for k in sflat:
        if not k.startswith("layers/mlp/"):
            assert np.array_equal(flat[k], sflat[k]), k
    # experts that also moved attention etc.: the mean of the experts (or the seed's with shared="seed")
    fulls = [branched(seed, 20 + i, ffn_only=False) for i in range(2)]
    avg = btx_jax.compose(seed, fulls, btx_jax.FfnMoESpec(top_k=1)).flat_numpy()
    ref = (fulls[0].flat_numpy()["layers/attn/q_proj/kernel"] + fulls[1].flat_numpy()["layers/attn/q_proj/kernel"]) / 2
    assert np.allclose(avg["layers/attn/q_proj/kernel"], ref, atol=1e-7)
    kept = btx_jax.compose(seed, fulls, btx_jax.FfnMoESpec(top_k=1, shared="seed")).flat_numpy()
    assert np.array_equal(kept["embed_tokens"], sflat["embed_tokens"])
    # zero router: ties go to experts 0..k-1 (jax.lax.top_k is stable), like the LoRA-MoE
    zero = btx_jax.compose(seed, experts, btx_jax.FfnMoESpec(top_k=1, router_init="zeros"))
    ids = random_ids(1, 6)
    assert np.abs(zero.logits(ids) - experts[0].logits(ids)).max() <= 1e-5


def test_sources_agree_and_lora_experts_are_materialised(setup, tmp_path):
    seed_dir, seed, experts = setup
    hf_dir = experts[0].save_pretrained(tmp_path / "hf", format="hf")
    btx_dir = experts[1].save_pretrained(tmp_path / "btx", format="btx")
    a = btx_jax.compose(seed_dir, [hf_dir, btx_dir, experts[2]], btx_jax.FfnMoESpec(top_k=2, router_seed=1))
    b = btx_jax.compose(seed, experts, btx_jax.FfnMoESpec(top_k=2, router_seed=1))
    assert a.config == b.config
    fa, fb = a.flat_numpy(), b.flat_numpy()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    # a LoRA expert (PEFT dir) becomes W + B A s: the same as its merged HF export
    lora = random_lora(seed, targets=FFN, seed=5, scale=0.1)
    peft_dir = lora.save_pretrained(tmp_path / "peft", format="peft")
    merged = lora.save_pretrained(tmp_path / "merged", format="hf", merge_lora=True)
    x = btx_jax.compose(seed_dir, [peft_dir], btx_jax.FfnMoESpec(top_k=1)).flat_numpy()
    y = btx_jax.compose(seed_dir, [merged], btx_jax.FfnMoESpec(top_k=1)).flat_numpy()
    assert all(np.allclose(x[k], y[k], rtol=0, atol=1e-6) for k in x)      # folded on device vs by numpy
    assert not np.array_equal(x["layers/moe/up_proj"][:, 0], seed.flat_numpy()["layers/mlp/up_proj/kernel"])
    ids = random_ids(1, 6)
    moe = btx_jax.compose(seed, [peft_dir], btx_jax.FfnMoESpec(top_k=1))
    assert np.abs(moe.logits(ids) - lora.logits(ids)).max() <= 1e-4


def test_mesh_builds_the_ffn_moe_into_its_shardings(setup):
    """compose(..., mesh=) builds an FFN-MoE leaf by leaf into the mesh's shardings: the same weights."""
    _, seed, experts = setup
    mesh = btx_jax.mesh.make_mesh({"data": 1, "fsdp": 4, "tensor": 1, "expert": 2})
    spec = btx_jax.FfnMoESpec(top_k=2, seed_expert=True)
    sharded = btx_jax.compose(seed, experts, spec, mesh=mesh)
    stack = sharded.params["layers"]["moe"]["up_proj"]
    assert len(stack.sharding.device_set) == 8 and stack.sharding.mesh.shape["expert"] == 2
    here = btx_jax.compose(seed, experts, spec).flat_numpy()
    got = sharded.flat_numpy()
    assert all(np.array_equal(got[k], here[k]) for k in here)
