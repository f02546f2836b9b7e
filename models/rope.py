"""Rotary position embeddings (Su et al. 2021) in HF's "rotate half" layout, with the Llama-3.1
frequency scaling (Meta's `apply_scaling`: long wavelengths divided by `factor`, short ones kept,
a smooth ramp between `low_freq_factor` and `high_freq_factor`).

Keys are cached after RoPE, so a cached key keeps the position it was computed at.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """x: [batch, tokens, heads, head_dim]; positions: [batch, tokens] int32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(config))
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def undo_rope(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """The inverse of `apply_rope` (rotation by minus each position's angles), in float32:
    recovers pre-RoPE vectors from cached or attending post-RoPE ones."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(config))
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos + second * sin, second * cos - first * sin], axis=-1)
