"""Flash-decoding's second step on a GPU: merge the partial results of the sequence splits.

The decode kernels (quantized_attention.py, quest_attention.py) give each program one slice of
the cache and write its unnormalised partial result: acc = sum_t exp(s_t - m) v_t, the slice's
running max m and sum l = sum_t exp(s_t - m). With M = max over the splits of m, the output and
its log-sum-exp are

    out = sum_s exp(m_s - M) acc_s / L,   L = sum_s exp(m_s - M) l_s,   lse = M + log L

(Dao et al. 2023, "Flash-Decoding for long-context inference"). Splits that saw no slot carry
m = -inf and weigh 0; a query that saw no slot at all gets out = 0 and lse = -inf.

One small Pallas kernel does it, one program per (batch, kv-head, query head): as plain JAX the
merge was three XLA fusions (their cost: docs/kernels.md, section "H100 run (2026-11-23, split
merge as one kernel)").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MAX_ROWS = 8192  # partial values a program loads at once (64 float32 registers per thread)


def _merge_kernel(*refs, n_splits: int, chunk: int, acc_parts: int):
    """acc [S, D] (as `acc_parts` summands), m [S], l [S] of one query head -> out [D], lse []."""
    acc_refs, (m_ref, l_ref, out_ref, lse_ref) = refs[:acc_parts], refs[acc_parts:]
    starts = range(0, n_splits, chunk)

    def split_stats(s0):  # the last chunk is moved back inside [0, S), its overlap masked
        start = max(0, min(s0, n_splits - chunk))
        rows = pl.ds(start, chunk)
        index = start + jnp.arange(chunk)
        ok = (index >= s0) & (index < n_splits)
        m = plgpu.load(m_ref.at[rows], mask=ok, other=-jnp.inf)
        l = plgpu.load(l_ref.at[rows], mask=ok, other=0.0)
        return rows, ok, m, l

    m_max = functools.reduce(jnp.maximum, [jnp.max(split_stats(s0)[2]) for s0 in starts])
    m_max = jnp.where(m_max > -jnp.inf, m_max, 0.0)
    total = jnp.zeros((), jnp.float32)
    out = jnp.zeros((acc_refs[0].shape[-1],), jnp.float32)
    for s0 in starts:
        rows, ok, m, l = split_stats(s0)
        w = jnp.exp(m - m_max)  # 0 for empty splits (m = -inf) and masked rows
        acc = sum(
            plgpu.load(r.at[rows, :], mask=ok[:, None], other=0.0).astype(jnp.float32)
            for r in acc_refs
        )
        total += jnp.sum(w * l)
        out += jnp.sum(w[:, None] * acc, axis=0)
    seen = total > 0
    out_ref[...] = jnp.where(seen, out / jnp.where(seen, total, 1.0), 0.0)
    lse_ref[...] = jnp.where(seen, m_max + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def merge_splits(
    acc: jax.Array,
    m: jax.Array,
    l: jax.Array,
    *,
    acc_low: jax.Array | None = None,
    heads: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Partials acc [B, H, S, G, D], m and l [B, H, S, G] -> out [B, H, G', D], lse [B, H, G'].

    float32 (acc may be bf16 when acc_low is given); S splits of H kv-heads with G query heads
    each (see module docstring).
    acc_low: acc's low half, same shape: the partial is acc + acc_low, summed in float32 (the
      Mosaic GPU int8 kernel hands its float32 partials over as two bf16 halves).
    heads: merge only the first G' <= G query heads (the rest are padding); default all.
    """
    b, h, n_splits, g, d = acc.shape
    heads = g if heads is None else heads
    acc_parts = [acc] if acc_low is None else [acc, acc_low]
    chunk = min(pl.next_power_of_2(n_splits), max(1, _MAX_ROWS // d))
    head = lambda *tail: pl.BlockSpec(
        (pl.squeezed, pl.squeezed, n_splits, pl.squeezed, *tail),
        lambda i, j, k: (i, j, 0, k) + (0,) * len(tail),
    )
    result = lambda *tail: pl.BlockSpec(
        (pl.squeezed,) * 3 + tail, lambda i, j, k: (i, j, k) + (0,) * len(tail)
    )
    return pl.pallas_call(
        functools.partial(_merge_kernel, n_splits=n_splits, chunk=chunk, acc_parts=len(acc_parts)),
        grid=(b, h, heads),
        in_specs=[head(d)] * len(acc_parts) + [head(), head()],
        out_specs=[result(d), result()],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, heads, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, heads), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="merge_splits",
    )(*acc_parts, m, l)
