"""Pallas GPU kernels for Quest's page selection: page scores, then the top-K pages per kv-head.

Computes exactly what `quest_reference.page_scores_reference` and `select_pages_reference`
document (the reference is the documentation):

- `_scores_kernel`, grid (batch, kv-head, page block): loads the min / max metadata of
  `pages_per_block` pages and the group's query heads (padded to the tensor cores' 16 rows), and
  computes every head's bound with two matrix products, since for m <= M
      max(q * m, q * M) = max(q, 0) * M + min(q, 0) * m,
  then takes the max over the group and marks the newest page +inf and unused pages -inf.
- `_select_kernel`, grid (batch, kv-head): one program holds the head's whole row of scores in
  registers and finds the K-th largest exactly by a radix select over the float bits (32 rounds
  of compare-and-count by default, no sort); pages above it are kept, ties at it go to the lower
  pages (a prefix sum), and the kept pages are compacted in ascending order by a second prefix
  sum and a scatter store.

GPU lowering: Pallas Triton (as `quantized_attention.py`). Elsewhere the dispatcher uses the
reference; XLA's top_k is what a TPU would use anyway.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import cannot_run, choose_implementation
from pallas_kernels.errors import UserError
from pallas_kernels.quest_reference import (page_scores_reference, pages_in_use,
                                            select_pages_reference)

IMPLEMENTATIONS = ("reference", "pallas_gpu")
MAX_PAGES = 1 << 15  # the selection keeps a head's whole score row in one program's registers
_INT_MIN = -(1 << 31)

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def _per_head(x):
    """The whole slab of one (batch, kv-head) for every program of that pair."""
    rest = x.shape[2:]
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *rest),
                        lambda b, h, *_: (b, h) + (0,) * len(rest))


def _dot_t(a, b, precise: bool):
    """a [M, K] @ b [N, K]^T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST if precise else None,
                           preferred_element_type=jnp.float32)


def _scores_kernel(length_ref, q_ref, min_ref, max_ref, out_ref, *, group, rows,
                   pages_per_block, page_size, n_pages_total):
    n_pages = (length_ref[()] + page_size - 1) // page_size
    p0 = pl.program_id(2) * pages_per_block
    page = p0 + jnp.arange(pages_per_block)
    in_use = page < n_pages
    row_ok = jnp.arange(rows) < group
    q = plgpu.load(q_ref.at[pl.ds(0, rows), :], mask=row_ok[:, None], other=0)
    lo = plgpu.load(min_ref.at[pl.ds(p0, pages_per_block), :], mask=in_use[:, None], other=0)
    hi = plgpu.load(max_ref.at[pl.ds(p0, pages_per_block), :], mask=in_use[:, None], other=0)
    precise = q.dtype == jnp.float32
    zero = jnp.zeros((), q.dtype)
    bound = (_dot_t(jnp.maximum(q, zero), hi.astype(q.dtype), precise)
             + _dot_t(jnp.minimum(q, zero), lo.astype(q.dtype), precise))  # [rows, pages]
    score = jnp.max(jnp.where(row_ok[:, None], bound, -jnp.inf), axis=0)
    score = jnp.where(page == n_pages - 1, jnp.inf, jnp.where(in_use, score, -jnp.inf))
    plgpu.store(out_ref.at[pl.ds(p0, pages_per_block)], score, mask=page < n_pages_total)


def _int32(value: int) -> int:
    """A 32-bit pattern as the int32 value it encodes."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _select_kernel(length_ref, scores_ref, pages_ref, count_ref, *, n_select, padded_select,
                   padded_pages, n_pages_total, page_size, radix_bits):
    page = jnp.arange(padded_pages)
    s = plgpu.load(scores_ref.at[pl.ds(0, padded_pages)], mask=page < n_pages_total,
                   other=-jnp.inf)
    n_pages = (length_ref[()] + page_size - 1) // page_size
    k = jnp.minimum(n_pages, n_select)
    # Float bits -> int32 in the same order (negative floats: flip all but the sign bit).
    bits = lax.bitcast_convert_type(s, jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # Radix select: the largest t with #(key >= t) >= k, built `radix_bits` bits per round
    # (offset-binary, so that bit patterns order like unsigned numbers): each round counts the
    # keys above every nonzero extension of the prefix (one 1-D reduction each; 2-D counts cost
    # layout shuffles) and keeps the largest extension that still has k keys above it.
    prefix = jnp.int32(0)
    for high in range(32, 0, -radix_bits):
        shift = high - min(radix_bits, high)
        best = jnp.int32(0)
        for digit in range(1, 1 << (high - shift)):
            candidate = (prefix | _int32(digit << shift)) ^ _INT_MIN
            count = jnp.sum((key >= candidate).astype(jnp.int32))
            best += (count >= k).astype(jnp.int32)
        prefix = prefix | (best << shift)
    kth = prefix ^ _INT_MIN
    above = key > kth
    tie = key == kth
    room = k - jnp.sum(above.astype(jnp.int32))
    take = above | (tie & (jnp.cumsum(tie.astype(jnp.int32)) <= room))
    # Kept pages go to entries [0, k) in page order; the others get distinct entries past the
    # end (masked off; interpret mode writes masked lanes back, so they must not collide).
    entry = jnp.where(take, jnp.cumsum(take.astype(jnp.int32)) - 1, n_select + page)
    plgpu.store(pages_ref.at[entry], page, mask=take)
    last = jnp.max(jnp.where(take, page, 0))
    rest = jnp.arange(padded_select)
    plgpu.store(pages_ref.at[rest], jnp.full((padded_select,), last, jnp.int32),
                mask=(rest >= k) & (rest < n_select))
    count_ref[()] = k


def _pallas_gpu(q, page_min, page_max, lengths, page_size, n_select, *, interpret,
                pages_per_block=128, num_warps=4, select_warps=4, radix_bits=1):
    b, hq, d = q.shape
    hkv, n_pages = page_min.shape[1], page_min.shape[2]
    group = hq // hkv
    q4 = q.reshape(b, hkv, group, d)
    lengths = lengths.astype(jnp.int32)
    scalar = pl.BlockSpec((pl.squeezed, pl.squeezed), lambda i, h, *_: (i, h))
    pages_per_block = min(pages_per_block, max(16, pl.next_power_of_2(n_pages)))
    scores = pl.pallas_call(
        functools.partial(_scores_kernel, group=group, rows=max(16, pl.next_power_of_2(group)),
                          pages_per_block=pages_per_block, page_size=page_size,
                          n_pages_total=n_pages),
        grid=(b, hkv, pl.cdiv(n_pages, pages_per_block)),
        in_specs=[scalar, _per_head(q4), _per_head(page_min), _per_head(page_max)],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, n_pages), lambda i, h, j: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, n_pages), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="quest_page_scores",
    )(lengths, q4, page_min, page_max)
    pages, count = pl.pallas_call(
        functools.partial(_select_kernel, n_select=n_select,
                          padded_select=pl.next_power_of_2(n_select),
                          padded_pages=pl.next_power_of_2(n_pages), n_pages_total=n_pages,
                          page_size=page_size, radix_bits=radix_bits),
        grid=(b, hkv),
        in_specs=[scalar, _per_head(scores)],
        out_specs=[pl.BlockSpec((pl.squeezed, pl.squeezed, n_select), lambda i, h: (i, h, 0)),
                   scalar],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, n_select), jnp.int32),
                   jax.ShapeDtypeStruct((b, hkv), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=select_warps, num_stages=1),
        interpret=interpret, name="quest_select_pages",
    )(lengths, scores)
    return scores, pages, count


def check_select_inputs(q, page_min, page_max, lengths, page_size: int, n_select: int):
    if q.ndim != 3 or page_min.ndim != 4 or page_min.shape != page_max.shape:
        raise UserError(f"q must be [B, Hq, D] and page_min/page_max one [B, Hkv, P, D] shape, "
                        f"got {q.shape}, {page_min.shape}, {page_max.shape}")
    b, hq, d = q.shape
    if page_min.shape[0] != b or page_min.shape[3] != d or hq % page_min.shape[1]:
        raise UserError(f"q {q.shape} does not fit the page metadata {page_min.shape}")
    if lengths.shape != page_min.shape[:2]:
        raise UserError(f"lengths must be [B, Hkv]={page_min.shape[:2]}, got {lengths.shape}")
    if page_size < 1 or n_select < 1:
        raise UserError(f"page_size and n_select must be positive, got {page_size}, {n_select}")


def pallas_kernel_supports(q, page_min) -> str | None:
    """None if the Pallas kernels handle these shapes, else the reason they do not."""
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head_dim must be a power of two >= 16, got {d}"
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"q must be bfloat16 or float32, got {q.dtype}"
    if page_min.shape[2] > MAX_PAGES:
        return f"at most {MAX_PAGES} pages per head, got {page_min.shape[2]}"
    return None


def _implementation(q, page_min, implementation, interpret) -> str:
    def auto() -> str:
        on_gpu = jax.default_backend() == "gpu" and pallas_kernel_supports(q, page_min) is None
        return "pallas_gpu" if interpret or on_gpu else "reference"

    return choose_implementation(
        implementation, IMPLEMENTATIONS, auto=auto,
        refusals={"pallas_gpu": lambda: cannot_run("Pallas", pallas_kernel_supports(q, page_min))})


def quest_select(q, page_min, page_max, lengths, page_size: int, n_select: int, *,
                 implementation: str | None = None, interpret: bool = False, **kernel_options):
    """Quest's pages for one decode step: (pages int32 [B, Hkv, n_select], count int32 [B, Hkv]),
    as `quest_reference.quest_select_reference` (scores: max over each GQA group).

    implementation: "pallas_gpu" or "reference"; None picks the kernels on a GPU backend, else
    the reference. interpret: run the Pallas kernels in interpret mode (any backend).
    kernel_options: pages_per_block, num_warps (scores); select_warps, radix_bits (bits of the
    threshold found per round, 2**radix_bits - 1 counts each) for the selection.
    """
    return quest_select_with_scores(q, page_min, page_max, lengths, page_size, n_select,
                                    implementation=implementation, interpret=interpret,
                                    **kernel_options)[1:]


def quest_select_with_scores(q, page_min, page_max, lengths, page_size: int, n_select: int, *,
                             implementation: str | None = None, interpret: bool = False,
                             **kernel_options):
    """(scores float32 [B, Hkv, P], pages, count): `quest_select` with the page scores."""
    check_select_inputs(q, page_min, page_max, lengths, page_size, n_select)
    if _implementation(q, page_min, implementation, interpret) == "reference":
        scores = page_scores_reference(q, page_min, page_max, lengths, page_size)
        return (scores, *select_pages_reference(scores, n_select))
    return _pallas_gpu(q, page_min, page_max, lengths, page_size, n_select, interpret=interpret,
                       **kernel_options)


__all__ = ["quest_select", "quest_select_with_scores", "pallas_kernel_supports", "pages_in_use",
           "IMPLEMENTATIONS"]
