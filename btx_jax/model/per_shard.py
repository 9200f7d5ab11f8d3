"""Run an attention kernel per device, on its shard of the batch and heads, inside `shard_map`.

A Pallas call (the TPU splash kernel, the GPU Triton kernel) is opaque to XLA's sharding propagation: left to
itself XLA would replicate it, i.e. all-gather q, k and v onto every device.  `per_shard` instead runs the
kernel on each device's block: the batch over the mesh axes the mesh rules give the logical axis `batch`, the
query and KV heads alike over the axes the rules give `kv_heads` that the batch does not use and that divide
the KV heads (the same left-to-right rule as the weights, btx_jax/mesh.py `spec_for`), kept to those the rules
also give `q_heads`.  K divides N, so one split serves both and every query head's KV head stays on its
device (GQA).

The mesh comes from `jax.sharding.get_abstract_mesh()` and the rules from btx_jax/mesh.py
`rules_in_context()` (the train step sets both, btx_jax/train/step.py); without a mesh the kernel runs
unsharded.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from btx_jax import mesh as mesh_lib


def attention_specs(q_shape, k_shape, mesh, rules) -> tuple[P, P]:
    """(spec of q / k / v [B, T, heads, H], spec of the segment ids [B, T]) on `mesh` under `rules`."""
    batch, kv_heads = mesh_lib.spec_for(("batch", "kv_heads"), (q_shape[0], k_shape[2]), mesh, rules)
    heads = tuple(a for a in mesh_lib.entry_axes(kv_heads) if a in dict(rules)["q_heads"])
    return P(batch, None, heads[0] if len(heads) == 1 else heads or None, None), P(batch, None)


def per_shard(local, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    """local(q, k, v, segment_ids) -> out on each device's shard (the whole arrays without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    qkv, seg = attention_specs(q_BTNH.shape, k_BTKH.shape, mesh, mesh_lib.rules_in_context())
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                         check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
