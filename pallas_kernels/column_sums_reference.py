"""Plain-JAX reference for the attention each key receives during a causal prefill: the column
sums of the softmax matrix, which H2O scores by (Zhang et al., "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", NeurIPS 2023, and kvpress's
ObservedAttentionPress). It is the documentation of the kernel in `column_sums.py`.

For a prompt of `length` tokens, query head h at position i attends to key j when j <= i < length
(and i - j < window with a sliding window), with probability
    p[h, i, j] = exp(q[i, h] . k[j, g(h)] / sqrt(D) - lse[i, h])
where lse is the log-sum-exp of that query's scores, as the prefill's fused attention returns it
(`jax.nn.dot_product_attention(..., return_residual=True)`), so no row is normalised twice. The
result is, per kv-head g and key j, the sum of p over every valid query i and every query head h
of the group (the group's mean is the scorer's business).

Shapes: q [B, T, Hq, D]; k [B, T, Hkv, D]; lse [B, T, Hq] float32; lengths [B] int32 ->
column sums [B, Hkv, T] float32 (0 for keys at or past the length).

The reference walks the queries `chunk` rows at a time, so it never holds a T x T matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.errors import UserError


def check_column_sum_inputs(q, k, lse, lengths):
    b, t, hq, d = q.shape
    if k.ndim != 4 or k.shape[:2] != (b, t) or k.shape[3] != d or hq % k.shape[2]:
        raise UserError(f"keys {k.shape} do not match queries {q.shape} (need [B, T, Hkv, D], "
                        "Hkv dividing Hq)")
    if lse.shape != (b, t, hq):
        raise UserError(f"lse must be [B, T, Hq] = {(b, t, hq)}, got {lse.shape}")
    if lengths.shape != (b,):
        raise UserError(f"lengths must be [B] = {(b,)}, got {lengths.shape}")


def visible(query_positions, key_positions, lengths, window: int | None):
    """[B, tq, tk] bool: key j is seen by query i (causal, inside the window, i < length)."""
    i, j = query_positions[:, None], key_positions[None, :]
    seen = (j <= i) & (i < lengths[:, None, None])
    if window is not None:
        seen &= i - j < window
    return seen


def attention_column_sums_reference(q, k, lse, lengths, *, window: int | None = None,
                                    chunk: int = 256):
    """Column sums [B, Hkv, T] float32 of the causal softmax (see the module docstring)."""
    check_column_sum_inputs(q, k, lse, lengths)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    chunk = min(chunk, t)
    pad = -t % chunk
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, hkv, hq // hkv, d)
    lses = jnp.pad(lse, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, hkv, hq // hkv)
    keys = jnp.arange(t)

    def add_chunk(total, xs):
        q_chunk, lse_chunk, start = xs
        s = jnp.einsum("bihgd,bjhd->bhgij", q_chunk, k, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST) * d**-0.5
        p = jnp.exp(s - jnp.moveaxis(lse_chunk, 1, 3)[..., None])
        seen = visible(start + jnp.arange(chunk), keys, lengths, window)
        return total + jnp.where(seen[:, None, None], p, 0.0).sum(axis=(2, 3)), None

    starts = jnp.arange(qs.shape[1]) * chunk
    total, _ = jax.lax.scan(add_chunk, jnp.zeros((b, hkv, t), jnp.float32),
                            (jnp.moveaxis(qs, 1, 0), jnp.moveaxis(lses, 1, 0), starts))
    return total
