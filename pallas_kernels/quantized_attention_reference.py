"""Plain-JAX reference for decode attention over a quantized KV segment; it is the documentation.

One decode step: each sequence has one query token per query head, and attends to the first
`length[b]` slots of one cache segment. The segment's keys and values are `QuantizedTensor`s
(kv_packing.py): KIVI (per-channel keys, per-token values, 2/4/8 bits) or MaxText int8; or plain
dense [B, Hkv, T, D] arrays for an exact segment (a recent window, sinks).

Returned is this segment's softmax-normalised output and its log-sum-exp, so that segments (a
quantized body, an exact recent window, sinks) combine exactly with `merge_attention_segments`:

    lse = logsumexp_s(lse_s);  out = sum_s exp(lse_s - lse) * out_s

A segment with length 0 returns out = 0 and lse = -inf, which drops out of the merge.

Grouped-query attention: query head `i` reads kv-head `i // (Hq // Hkv)`; the K/V arrays are
never repeated per query head.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.errors import UserError
from pallas_kernels.kv_packing import QuantizedTensor, dequantize

_HIGHEST = jax.lax.Precision.HIGHEST


def _dense_shape(x: QuantizedTensor | jax.Array) -> tuple[int, ...]:
    if isinstance(x, QuantizedTensor):
        x.validate()
    elif x.ndim != 4:
        raise UserError(f"a dense K/V segment must be [B, Hkv, T, D], got shape {x.shape}")
    return tuple(x.shape)


def _as_dense(x: QuantizedTensor | jax.Array) -> jax.Array:
    return dequantize(x) if isinstance(x, QuantizedTensor) else x.astype(jnp.float32)


def check_decode_inputs(
    q: jax.Array, k: QuantizedTensor | jax.Array, v: QuantizedTensor | jax.Array, length: jax.Array
) -> None:
    """Raises UserError when the query, cache segment and lengths do not fit together."""
    k_shape, v_shape = _dense_shape(k), _dense_shape(v)
    if q.ndim != 3:
        raise UserError(f"q must be [B, Hq, D], got shape {q.shape}")
    b, hq, d = q.shape
    if k_shape != v_shape:
        raise UserError(f"keys {k_shape} and values {v_shape} must have the same [B, H, T, D]")
    kb, hkv, _, kd = k_shape
    if (kb, kd) != (b, d):
        raise UserError(f"q [B={b}, D={d}] does not match the cache [B={kb}, D={kd}]")
    if hq % hkv:
        raise UserError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if length.shape != (b,):
        raise UserError(f"length must be [B]={b}, got shape {length.shape}")


def decode_attention_dense(
    q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, sm_scale: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Exact decode attention over dense K/V [B, Hkv, T, D] in float32: (out [B,Hq,D], lse [B,Hq])."""
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d) * scale
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k.astype(jnp.float32), precision=_HIGHEST)
    valid = jnp.arange(t)[None, :] < length[:, None]  # [B, T]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # length 0: all -inf
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgt,bhtd->bhgd", p, v.astype(jnp.float32), precision=_HIGHEST)
    out = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def quantized_decode_attention_reference(
    q: jax.Array,
    k: QuantizedTensor | jax.Array,
    v: QuantizedTensor | jax.Array,
    length: jax.Array,
    *,
    sm_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decode attention of q [B, Hq, D] over a quantized segment.

    Args:
      q: queries, one token per sequence, [B, Hq, D] (bfloat16 or float32).
      k, v: the segment's keys and values: `QuantizedTensor`s of dense shape [B, Hkv, T, D], or
        dense arrays of that shape.
      length: int32 [B], valid slots per sequence; slots >= length are ignored (may be garbage).
      sm_scale: softmax scale, 1/sqrt(D) by default.

    Returns:
      out: float32 [B, Hq, D], softmax-normalised over this segment's valid slots (0 if none).
      lse: float32 [B, Hq], log-sum-exp of the scaled scores over valid slots (-inf if none).
    """
    check_decode_inputs(q, k, v, length)
    length = jnp.clip(length.astype(jnp.int32), 0, k.shape[2])
    # Slots past `length` may hold garbage (even NaN scales): zero them before they meet p = 0.
    valid = (jnp.arange(k.shape[2])[None, :] < length[:, None])[:, None, :, None]
    kf = jnp.where(valid, _as_dense(k), 0.0)
    vf = jnp.where(valid, _as_dense(v), 0.0)
    return decode_attention_dense(q, kf, vf, length, sm_scale)


def merge_attention_segments(
    outs: Sequence[jax.Array], lses: Sequence[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Merges normalised per-segment outputs [B, Hq, D] by their lse [B, Hq] (float32)."""
    lse_all = jnp.stack([jnp.asarray(x, jnp.float32) for x in lses])  # [S, B, Hq]
    m = jnp.max(lse_all, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_all - m)  # 0 for empty segments
    total = jnp.sum(w, axis=0)
    out = sum(w_s[..., None] * o.astype(jnp.float32) for w_s, o in zip(w, outs))
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, lse
