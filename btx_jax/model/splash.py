"""TPU attention: JAX's Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention),
causal with segment ids, GQA without repeating K/V, inside `shard_map` over the mesh in context.

The kernel runs per device on its shard of the batch and heads, over the mesh axes the mesh rules give them
(btx_jax/model/per_shard.py).

The kernel keeps q, k, v, the output and the row log-sum-exp for its backward pass (no [T, S] tensor), like
btx_jax/model/attention.py's blocked kernel.  `interpret=True` runs the same kernel through the Pallas
interpreter on CPU (the parity tests); it is slow, so only tiny shapes.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from btx_jax.model.per_shard import per_shard

DEFAULT_BLOCK = 512          # query / key block of every pass (capped at T); 128-multiples suit the MXU


@functools.lru_cache(maxsize=32)
def _kernel(T: int, num_heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    b = min(block, T)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T))] * num_heads)
    # concrete arrays even when first built inside a trace: the cached kernel outlives it (else a tracer leaks
    # into the next jit that reuses the kernel)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _local(q_BTNH, k_BTKH, v_BTKH, seg_BT, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    T, N, H = q_BTNH.shape[1:]
    kernel = _kernel(T, N, block, interpret)
    q_BNTH = (q_BTNH * (1.0 / np.sqrt(H))).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    out_BNTH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q_BNTH, k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3), seg_BT)
    return out_BNTH.transpose(0, 2, 1, 3)


def splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block: int = DEFAULT_BLOCK, interpret: bool = False):
    """Causal, same-segment attention [B, T, N, H] (K | N heads for k, v) with the splash kernel."""
    local = functools.partial(_local, block=int(block), interpret=interpret)
    return per_shard(local, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
