"""GPU attention: JAX's Pallas Triton flash-attention kernel (jax.experimental.pallas.ops.gpu.attention.mha),
causal with packed segment ids, GQA without repeating K/V, per device inside `shard_map`
(btx_jax/model/per_shard.py).  Why this kernel, and what it costs against the XLA and cuDNN paths, is in
docs/gpu_attention.md.

The kernel keeps q, k, v, the output and the row log-sum-exp for its backward pass and recomputes the
probabilities block by block there (FlashAttention 2): no [T, S] tensor in either pass.  It takes one KV head
per query head, so GQA runs the kernel once per member of a query group (`jax.vmap` over the group, K and V
unbatched: the vmapped Pallas call reads the same K / V blocks for every member, nothing is repeated); the
backward gives each member's dK / dV and JAX sums them over the group ([B, T, N, H] each, the size of dQ).
`interpret=True` runs the same kernel through the Pallas interpreter on CPU (the parity tests; slow, so only
tiny shapes).

The sequence length must be a multiple of the block (the kernel's rule); blocks are capped at T.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from btx_jax.model.per_shard import per_shard

FORWARD_BLOCK, BACKWARD_BLOCK = 128, 64      # query / key rows per tile: forward pass, backward passes


def _local(q_BTNH, k_BTKH, v_BTKH, seg_BT, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    fwd, bwd = min(FORWARD_BLOCK, T), min(BACKWARD_BLOCK, T)
    for block in (fwd, bwd):
        if T % block:
            raise ValueError(f"triton attention: sequence length {T} is not a multiple of {block} (the kernel's "
                             "block); pad the rows or pick train.attention='blocked'")
    sizes = pallas_gpu.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
                                  block_kv_dq=bwd)
    kernel = functools.partial(pallas_gpu.mha, segment_ids=seg_BT, sm_scale=float(1.0 / np.sqrt(H)), causal=True,
                               block_sizes=sizes, interpret=interpret)
    q_GBTKH = q_BTNH.reshape(B, T, K, N // K, H).transpose(3, 0, 1, 2, 4)
    o_GBTKH = jax.vmap(kernel, in_axes=(0, None, None))(q_GBTKH, k_BTKH, v_BTKH)
    return o_GBTKH.transpose(1, 2, 3, 0, 4).reshape(B, T, N, H)


def triton_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, interpret: bool = False):
    """Causal, same-segment attention [B, T, N, H] (K | N heads for k, v) with the Pallas Triton kernel."""
    return per_shard(functools.partial(_local, interpret=interpret), q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
