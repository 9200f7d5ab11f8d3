"""Causal self-attention over packed sequences, and attention against a KV cache.

`causal_attention(..., impl="blocked")` (the default) is a custom-VJP attention that
  * splits the queries into blocks of `block` rows (at most MAX_BLOCKS blocks) and lets block i see keys
    [0, end of block i) only, so the fully masked upper triangle is never computed ((n+1)/2n of the T x T work
    for n blocks);
  * builds each block's mask from the segment ids (causal and same-document) instead of materialising [T, S];
  * saves only q, k, v, the output and the row log-sum-exp for the backward pass, and recomputes the
    probabilities there (FlashAttention's recurrence without the tiling loop), so no [B, N, T, S] tensor is
    kept between the passes.
On XLA:CPU it runs the bench model's attention forward+backward about 2x faster than
`jax.nn.dot_product_attention` with a full mask (docs/performance.md). `impl="xla"` is that reference.
Scores, softmax and the log-sum-exp are fp32 whatever the compute dtype.

Per backend (`impl="auto"`, the default, resolved by `resolve(impl, platform)`):
    tpu   "splash": JAX's Pallas splash-attention kernel with segment ids, in shard_map (btx_jax/model/splash.py)
    cuda  "triton": JAX's Pallas Triton flash-attention kernel with segment ids, in shard_map
          (btx_jax/model/triton_attention.py; docs/gpu_attention.md).  cuDNN flash attention
          (`jax.nn.dot_product_attention(implementation="cudnn")`) takes a causal mask and per-row lengths but
          no packed segment ids, so it is only right for rows holding one document followed by padding:
          `impl="cudnn"` selects it for such data.
    rocm  "xla": the masked path (the Triton kernel is not checked there)
    cpu   "blocked"
"""
from __future__ import annotations

from functools import partial

import logging

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax.config import ATTENTION_IMPLS
from btx_jax.model.splash import splash_attention
from btx_jax.model.triton_attention import triton_attention

IMPLS = ATTENTION_IMPLS
BY_PLATFORM = {"tpu": "splash", "gpu": "triton", "cuda": "triton", "rocm": "xla", "cpu": "blocked"}
DEFAULT_IMPL, DEFAULT_BLOCK = "auto", 64      # the model's defaults (configs/common.py repeats the literals)
MAX_BLOCKS = 16
_NEG = -1e30
_said: set[str] = set()


def resolve(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` means on `platform` (default: JAX's default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    picked = BY_PLATFORM.get(platform, "blocked")
    if picked == "xla" and platform not in _said:
        _said.add(platform)
        logging.getLogger("btx_jax").warning(
            "attention on %s: the masked XLA path runs ([T, T] scores per head; the Pallas Triton kernel, "
            "train.attention='triton', is checked on CUDA only)", platform)
    return picked


def _block_mask(seg_BT, start: int, stop: int):
    """[B, 1, 1, C, stop]: query rows start..stop-1 against keys 0..stop-1, causal and same segment."""
    causal_CL = (start + jnp.arange(stop - start))[:, None] >= jnp.arange(stop)[None, :]
    same_BCL = seg_BT[:, start:stop, None] == seg_BT[:, None, :stop]
    return (causal_CL[None] & same_BCL)[:, None, None]


def _scores(q_BKGCH, k_BKLH, mask, scale):
    s = jnp.einsum("bkgch,bklh->bkgcl", q_BKGCH, k_BKLH, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, _NEG)


def _blocks(T: int, block: int):
    """Query row ranges: `block` rows each, but at most MAX_BLOCKS blocks (every block is unrolled in the
    compiled graph, so longer sequences get longer blocks instead of a longer compile)."""
    block = max(block, -(-T // MAX_BLOCKS))
    return [(i, min(i + block, T)) for i in range(0, T, block)]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q_BKGTH, k_BKSH, v_BKSH, seg_BT, scale: float, block: int):
    return _blocked_fwd(q_BKGTH, k_BKSH, v_BKSH, seg_BT, scale, block)[0]


def _blocked_fwd(q_BKGTH, k_BKSH, v_BKSH, seg_BT, scale, block):
    outs, lses = [], []
    for start, stop in _blocks(q_BKGTH.shape[3], block):
        s = _scores(q_BKGTH[:, :, :, start:stop], k_BKSH[:, :, :stop], _block_mask(seg_BT, start, stop), scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgcl,bklh->bkgch", p.astype(v_BKSH.dtype), v_BKSH[:, :, :stop],
                       preferred_element_type=jnp.float32)
        outs.append((o / denom).astype(q_BKGTH.dtype))
        lses.append(m + jnp.log(denom))
    o_BKGTH = jnp.concatenate(outs, axis=3)
    return o_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, seg_BT, o_BKGTH, jnp.concatenate(lses, axis=3))


def _blocked_bwd(scale, block, res, do_BKGTH):
    q, k, v, seg, o, lse = res
    delta = jnp.sum(do_BKGTH.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, stop in _blocks(q.shape[3], block):
        rows = slice(start, stop)
        q_c, do_c = q[:, :, :, rows], do_BKGTH[:, :, :, rows]
        p = jnp.exp(_scores(q_c, k[:, :, :stop], _block_mask(seg, start, stop), scale) - lse[:, :, :, rows])
        dv = dv.at[:, :, :stop].add(jnp.einsum("bkgcl,bkgch->bklh", p.astype(do_c.dtype), do_c,
                                               preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkgch,bklh->bkgcl", do_c, v[:, :, :stop], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, :, rows]) * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("bkgcl,bklh->bkgch", ds, k[:, :, :stop], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :stop].add(jnp.einsum("bkgcl,bkgch->bklh", ds, q_c, preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def causal_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, impl: str = DEFAULT_IMPL,
                     block: int = DEFAULT_BLOCK):
    """Each token attends to itself and the earlier tokens of its own segment. GQA when K < N.  `block` is the
    query block of "blocked"; the other kernels use their own."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    scale = 1.0 / np.sqrt(H)
    impl = resolve(impl)
    if impl == "splash":
        return splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if impl == "triton":
        return triton_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    if impl == "cudnn":         # one document per row, then padding (segment id 0): lengths say it all
        lengths_B = jnp.sum(segment_ids_BT > 0, axis=1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, is_causal=True,
                                            query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                            implementation="cudnn")
    if impl == "xla":
        idx = jnp.arange(T)
        mask_BqTS = ((idx[:, None] >= idx[None, :])[None]
                     & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]))[:, None]
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_BqTS, scale=scale)
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    o_BKGTH = _blocked(q_BKGTH, k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3), segment_ids_BT,
                       scale, int(block))
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def cached_attention(q_BTNH, k_BSKH, v_BSKH, cache_index):
    """Queries at positions cache_index.. against a cache holding keys 0..S-1 (later slots masked)."""
    q_idx = cache_index + jnp.arange(q_BTNH.shape[1])
    mask_BqTS = (jnp.arange(k_BSKH.shape[1])[None, :] <= q_idx[:, None])[None, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BqTS,
                                        scale=1.0 / np.sqrt(q_BTNH.shape[-1]))
