"""Sharded loading (btx_jax/pretrained.py, btx_jax/mesh.py place): on 8 virtual devices every leaf lands in the
sharding the logical-axis rules give it, each device's shard is read on its own (no read of a whole sharded
tensor), the values equal the unsharded load, and transformers' logits still match."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import btx_jax
from btx_jax import mesh as mesh_lib, param_paths
from btx_jax.checkpoint.tensor_files import TensorReader
from conftest import hf_logits, random_ids


def _mesh():
    return mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def test_hf_load_is_sharded_by_the_rules_and_read_per_shard(hf_llama, monkeypatch):
    assert jax.device_count() == 8
    path = hf_llama(hidden_size=64, intermediate_size=128, head_dim=16)
    reads = []
    real = TensorReader.get_slice

    def spy(self, name, index):
        out = real(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(TensorReader, "get_slice", spy)
    mesh = _mesh()
    pre = btx_jax.load_pretrained(path, mesh=mesh)
    sharded_keys = set()
    for path_, leaf in param_paths.flatten(pre.params).items():
        want = mesh_lib.spec_for(param_paths.rule_for(path_).axes, leaf.shape, mesh)
        assert leaf.sharding.spec == want, path_
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        for shard in leaf.addressable_shards:
            assert shard.data.shape == shard_shape
        if shard_shape != leaf.shape:
            sharded_keys.update(k for _, k in param_paths.hf_keys(path_, pre.config.num_layers))
    assert sharded_keys, "the fsdp rules shard every weight matrix"
    for name, size, full in reads:
        if name in sharded_keys:
            assert size <= full // 8, f"{name}: read {size} of {full} elements at once"
    one = btx_jax.load_pretrained(path)
    for k, v in one.flat_numpy().items():
        np.testing.assert_array_equal(np.asarray(param_paths.flatten(pre.params)[k]), v, err_msg=k)
    ids = random_ids(2, 12)
    np.testing.assert_allclose(pre.logits(ids), hf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_no_device_holds_a_whole_sharded_leaf(hf_llama):
    path = hf_llama(hidden_size=64, intermediate_size=128, head_dim=16)
    before = {id(a) for a in jax.live_arrays()}
    pre = btx_jax.load_pretrained(path, mesh=_mesh(), dtype="bfloat16")
    shapes = {tuple(v.shape) for v in param_paths.flatten(pre.params).values()
              if v.sharding.shard_shape(v.shape) != v.shape}
    for a in jax.live_arrays():
        if id(a) not in before and len(a.sharding.device_set) == 1:
            assert tuple(a.shape) not in shapes, f"a whole {a.shape} leaf lives on one device"


def test_compose_builds_the_moe_sharded(hf_llama, tmp_path):
    path = hf_llama(hidden_size=64, intermediate_size=128, head_dim=16)
    from btx_jax.train.model_init import lora_spec, with_fresh_lora
    experts = []
    for i in range(2):
        src = with_fresh_lora(btx_jax.pretrained.open_model(path), lora_spec({"rank": 4, "alpha": 8.0}), seed=i)
        pre = src.load()
        experts.append(pre.save_pretrained(tmp_path / f"e{i}", format="peft"))
    mesh = _mesh()
    moe = btx_jax.compose(path, experts, btx_jax.LoraMoESpec(top_k=1), mesh=mesh)
    here = btx_jax.compose(path, experts, btx_jax.LoraMoESpec(top_k=1))
    for k, v in param_paths.flatten(moe.params).items():
        assert v.sharding.spec == mesh_lib.spec_for(param_paths.rule_for(k).axes, v.shape, mesh), k
        np.testing.assert_array_equal(np.asarray(v), here.flat_numpy()[k], err_msg=k)


def test_inference_mesh_is_one_device_on_cpu():
    """Virtual CPU devices share the host's memory: evaluation holds a model on one of them (sharding over 8
    would give each its own gathered copy of every layer in the forward pass)."""
    mesh = mesh_lib.inference_mesh()
    assert jax.device_count() == 8 and mesh.devices.size == 1 and mesh.devices.flat[0] == jax.local_devices()[0]


def test_a_converted_leaf_is_held_once_on_cpu():
    """place() converts a leaf into a buffer the CPU device adopts as it is: the array's memory is that buffer
    (a large numpy array is 16 bytes off a 64-byte boundary, which XLA:CPU would copy, holding the leaf twice)."""
    leaf = np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024)
    made = []
    real = mesh_lib.host_buffer

    def spy(x, dtype):
        made.append(real(x, dtype))
        return made[-1]

    target = mesh_lib.sharded_target({"embed_tokens": jax.ShapeDtypeStruct(leaf.shape, np.float32)})["embed_tokens"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mesh_lib, "host_buffer", spy)
        placed = mesh_lib.place(leaf, target)
    assert len(made) == 1 and placed.dtype == np.float32
    assert placed.addressable_data(0).unsafe_buffer_pointer() == made[0].ctypes.data
    np.testing.assert_array_equal(np.asarray(placed), leaf.astype(np.float32))
