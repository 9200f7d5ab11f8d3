"""Rotary position embeddings in Hugging Face's rotate-half layout (HF q/k weights load unpermuted),
with `linear` and `llama3` frequency scaling."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """[head_dim/2] inverse frequencies, scaled as transformers does for `linear` and `llama3`."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv_freq.astype(np.float32)
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BTNH: jnp.ndarray, positions_BT: jnp.ndarray, inv_freq_F: np.ndarray) -> jnp.ndarray:
    """Rotate q or k by their per-token positions (fp32 math, result in x's dtype)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_F)
    angles_BTH = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BTH), jnp.sin(angles_BTH)
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)
