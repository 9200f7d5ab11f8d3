"""btx_jax/model/triton_attention.py: JAX's Pallas Triton flash-attention kernel, run on CPU through the Pallas
interpreter, agrees with the masked reference (values and gradients, fp32 and bf16, packed segments, GQA), also
inside shard_map over a mesh sharded by the mesh rules in context (btx_jax/model/per_shard.py); and the real
train step compiled for 8 compile-only H100s (jax[cuda12], deviceless) runs the kernel and keeps its
temporaries below one [B, heads, T, T] fp32 score buffer, where the masked XLA path does not."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from btx_jax import mesh as mesh_lib
from btx_jax.model.attention import causal_attention
from btx_jax.model.per_shard import attention_specs
from btx_jax.model.triton_attention import triton_attention

from attention_parity import T, assert_matches_reference, inputs, value_and_grads  # noqa: E402

H100_TARGET = Path(__file__).resolve().parents[1] / "btx_jax" / "train" / "gpu_targets" / "h100_sxm.txtpb"


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_triton_interpret_matches_reference(dtype, tol):
    assert_matches_reference(lambda q, k, v, seg: triton_attention(q, k, v, seg, interpret=True), dtype, tol,
                             N=4, K=2, segments=5)


def test_triton_rejects_a_sequence_off_its_block():
    q, k, v, _, seg = inputs(N=4, K=2, segments=5)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        triton_attention(q[:, :100], k[:, :100], v[:, :100], seg[:, :100], interpret=True)


def test_specs_follow_the_mesh_rules():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 2, 2, 2), mesh_lib.MESH_AXES)
    assert attention_specs((4, T, 4, 32), (4, T, 2, 32), mesh, mesh_lib.DEFAULT_RULES) == (
        P(("fsdp", "expert"), None, "tensor", None), P(("fsdp", "expert"), None))
    batch_on_expert = (("batch", ("expert",)),) + tuple(r for r in mesh_lib.DEFAULT_RULES if r[0] != "batch")
    assert attention_specs((4, T, 4, 32), (4, T, 2, 32), mesh, batch_on_expert) == (
        P("expert", None, "tensor", None), P("expert", None))          # 2 KV heads: not over tensor x fsdp
    assert attention_specs((4, T, 8, 32), (4, T, 4, 32), mesh, batch_on_expert)[0] == P(
        "expert", None, ("tensor", "fsdp"), None)
    # one KV head cannot be split: heads stay whole (each query group stays with its KV head)
    assert attention_specs((4, T, 4, 32), (4, T, 1, 32), mesh, mesh_lib.DEFAULT_RULES)[0] == P(
        ("fsdp", "expert"), None, None, None)
    heads_not_split = tuple((a, ()) if a == "q_heads" else (a, m) for a, m in mesh_lib.DEFAULT_RULES)
    assert attention_specs((4, T, 4, 32), (4, T, 2, 32), mesh, heads_not_split)[0] == P(
        ("fsdp", "expert"), None, None, None)


def test_triton_in_shard_map_over_the_mesh_rules():
    q, k, v, w, seg = inputs(B=2, N=4, K=2, seed=1, segments=5)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 2, 2), mesh_lib.MESH_AXES)

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), mesh_lib.use_rules(mesh_lib.DEFAULT_RULES):
            return triton_attention(q, k, v, seg, interpret=True)

    text = jax.jit(sharded).lower(q, k, v).as_text()
    assert '[{"expert"}, {}, {"tensor"}, {}]' in text
    with jax.set_mesh(mesh):
        val, grads = jax.jit(lambda q, k, v: value_and_grads(sharded, q, k, v, w))(q, k, v)
    ref_val, ref_grads = value_and_grads(lambda q, k, v: causal_attention(q, k, v, seg, "xla"), q, k, v, w)
    np.testing.assert_allclose(val, ref_val, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5)


def h100_devices(n: int):
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET.read_text(),
                                        topology=f"1x1x{n}").devices


def compiled_gpu_step(attention: str, B: int, seq: int, arch: dict):
    from btx_jax.config import LlamaConfig
    from btx_jax.data.packing import FIELDS
    from btx_jax.pretrained import random_source
    from btx_jax.train.model_init import lora_spec
    from btx_jax.train.trainer import resolved, wire
    from btx_jax.configs import expert

    c = expert.get_config("synthetic")
    c.model.arch.update(arch)
    c.train.update(global_batch_size=B, seq_len=seq, dtype="bfloat16", frozen_dtype="bfloat16", attention=attention,
                   remat="full")
    cfg = resolved(c)
    config = LlamaConfig(**cfg["model"]["arch"]).replace(adapter=lora_spec(cfg["model"]["lora"]))
    mesh = mesh_lib.make_mesh(cfg["mesh"], h100_devices(8))
    built = wire(cfg, mesh, random_source(config, 0)).built
    batch = {k: jax.ShapeDtypeStruct((B, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=built.batch_sharding) for k in FIELDS}
    return built.step_fn.lower(built.abstract_state, batch).compile()


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason='jax_cuda12_plugin is not installed (pip install "jax[cuda12]"): no GPU compiler')
@pytest.mark.skipif(not H100_TARGET.is_file(), reason=f"no H100 GpuTargetConfig at {H100_TARGET}")
def test_train_step_compiles_the_kernel_for_8_h100s_without_a_t_by_t_buffer():
    B, seq, heads = 8, 2048, 4
    arch = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=heads,
                num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=seq)
    scores_bytes = (B // 8) * heads * seq * seq * 4          # one fp32 [B, heads, T, T] buffer per GPU
    flash = compiled_gpu_step("auto", B, seq, arch)
    assert "__gpu$xla.gpu.triton" in flash.as_text()
    assert flash.memory_analysis().temp_size_in_bytes < scores_bytes
    masked = compiled_gpu_step("xla", B, seq, arch)          # the same step with the [T, T] path: over the bound
    assert "__gpu$xla.gpu.triton" not in masked.as_text()
    assert masked.memory_analysis().temp_size_in_bytes > scores_bytes
