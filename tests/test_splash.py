"""btx_jax/model/splash.py: the TPU splash-attention kernel, run on CPU through the Pallas interpreter, agrees
with jax.nn.dot_product_attention under a full causal + segment mask (values and gradients, fp32 and bf16,
packed segments, GQA), also inside shard_map over a mesh, sharded by the mesh rules in context; and the TPU path compiles inside the real train step
for a TPU topology when libtpu is installed (skipped otherwise)."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from btx_jax.model.attention import causal_attention, resolve
from btx_jax.model.splash import splash_attention
from btx_jax.mesh import MESH_AXES

from attention_parity import T, assert_matches_reference, inputs  # noqa: E402

@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_splash_interpret_matches_reference(dtype, tol):
    assert_matches_reference(lambda q, k, v, seg: splash_attention(q, k, v, seg, interpret=True), dtype, tol)


def test_splash_in_shard_map_over_the_mesh_batch():
    q, k, v, w, seg = inputs(B=2, seed=1)
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2, 1, 1), MESH_AXES)

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return splash_attention(q, k, v, seg, interpret=True)

    lowered = jax.jit(sharded).lower(q, k, v)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    with jax.set_mesh(mesh):
        out = jax.jit(sharded)(q, k, v)
    np.testing.assert_allclose(out, causal_attention(q, k, v, seg, "xla"), atol=2e-5)


def test_splash_shards_by_the_mesh_rules_in_context():
    """Custom mesh rules move the kernel's batch axes: with the batch on `expert` only, the shard_map splits
    the batch over `expert` and leaves `fsdp` alone (the old hard-coded ("data", "fsdp") did the opposite)."""
    from btx_jax import mesh as mesh_lib
    q, k, v, w, seg = inputs(B=2, seed=2)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 2, 1, 2), MESH_AXES)
    rules = (("batch", ("expert",)),) + tuple(r for r in mesh_lib.DEFAULT_RULES if r[0] != "batch")

    def sharded(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), mesh_lib.use_rules(rules):
            return splash_attention(q, k, v, seg, interpret=True)

    text = jax.jit(sharded).lower(q, k, v).as_text()
    assert '{"expert"}' in text and '{"fsdp"}' not in text
    with jax.set_mesh(mesh):
        out = jax.jit(sharded)(q, k, v)
    np.testing.assert_allclose(out, causal_attention(q, k, v, seg, "xla"), atol=2e-5)


def test_auto_picks_the_backend_kernel():
    assert resolve("auto", "tpu") == "splash"
    assert resolve("auto", "cpu") == "blocked"
    assert resolve("auto", "gpu") == resolve("auto", "cuda") == "triton"   # packed segments: not cuDNN
    assert resolve("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="flash"):
        resolve("flash", "tpu")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install -e ".[tpu]"): no TPU compiler to compile for')
def test_splash_compiles_inside_the_train_step_for_a_tpu_topology():
    from btx_jax import mesh as mesh_lib
    from btx_jax.pretrained import random_source
    from btx_jax.train import aot
    from btx_jax.data.packing import FIELDS
    from btx_jax.train.trainer import resolved, wire
    from btx_jax.train.model_init import lora_spec
    from btx_jax.config import LlamaConfig
    from btx_jax.configs import expert

    target = aot.parse_target("tpu:v5e-4")
    with aot.compile_only(target):
        c = expert.get_config("synthetic")
        arch = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=512)
        c.train.update(global_batch_size=4, seq_len=256, dtype="bfloat16", frozen_dtype="bfloat16", attention="auto")
        cfg = resolved(c)
        config = LlamaConfig(**arch).replace(adapter=lora_spec(cfg["model"]["lora"]))
        mesh = mesh_lib.make_mesh(cfg["mesh"], aot.target_devices(target))
        built = wire(cfg, mesh, random_source(config, 0)).built
        batch = {k: jax.ShapeDtypeStruct((4, 256), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=built.batch_sharding) for k in FIELDS}
        compiled, _ = aot.compile_lowered(built.step_fn.lower(built.abstract_state, batch), "tiny", log=lambda _: None)
        hlo = compiled.as_text()
        assert "tpu_custom_call" in hlo and "splash" in hlo.lower()
        assert aot.cost_model(compiled, target)["step_s"] > 0
