"""Pallas decode attention over the pages Quest selected: reads only those pages.

Computes what `quest_reference.quest_decode_attention_reference` documents (without its optional
sliding-window mask), from the page indices `quest_select` returns, like a paged-attention kernel
reads a page table:

- GPU (`_gpu_kernel`, Pallas Triton), grid (batch, kv-head, split): each program owns a run of
  the head's selected-page list and walks it `pages_per_block` pages at a time: it loads those
  entries of the list, turns them into cache slots, gathers the keys and values of those slots
  (rows of D contiguous elements), and runs two small matrix products and an online softmax for
  the group's query heads (rows of one matrix, padded to 16). Each split writes its partial
  (acc, max, sum); a second small kernel (split_merge.py) merges them by log-sum-exp.
- TPU (`_tpu_kernel`, Mosaic), grid (batch, kv-head, selected entry): the page list, counts and
  lengths are scalar-prefetched into SMEM and the key/value BlockSpecs' index maps read the page
  of each grid step from them, so the pipeline DMAs exactly the selected pages (an entry past
  `count` repeats the last page and is skipped, so nothing new is fetched for it); the online
  softmax state lives in VMEM scratch across the entries. Checked here in TPU interpret mode
  only; no TPU was available, so the dispatcher does not pick it by itself.

The dispatcher picks the GPU kernel on a GPU backend (for shapes it supports, no sliding window)
and the reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import cannot_run, choose_implementation
from pallas_kernels.errors import UserError
from pallas_kernels.ptx import LN2, LOG2E, exp2
from pallas_kernels.split_merge import merge_splits
from pallas_kernels.quest_reference import quest_decode_attention_reference

IMPLEMENTATIONS = ("reference", "pallas_gpu", "pallas_tpu")

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


@dataclasses.dataclass(frozen=True)
class _Config:
    group: int  # query heads per kv-head
    rows: int  # group padded to the tensor cores' 16 rows
    head_dim: int
    page_size: int
    pages_per_block: int  # selected pages per loop step
    pages_per_split: int  # selected pages per program (a multiple of pages_per_block)
    sm_scale: float
    precise: bool  # float32 operands: exact float32 products (else bf16 MMA)
    interpret: bool


def _dot(a, b, precise, transpose_b=False):
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST if precise else None,
                           preferred_element_type=jnp.float32)


def _gpu_kernel(length_ref, count_ref, pages_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                cfg: _Config):
    length, count = length_ref[()], count_ref[()]
    first = pl.program_id(2) * cfg.pages_per_split
    end = jnp.minimum(count, first + cfg.pages_per_split)
    n_blocks = pl.cdiv(jnp.maximum(end - first, 0), cfg.pages_per_block)
    block = cfg.pages_per_block * cfg.page_size
    row_ok = jnp.arange(cfg.rows) < cfg.group
    q = plgpu.load(q_ref.at[pl.ds(0, cfg.rows), :], mask=row_ok[:, None], other=0)
    token = jnp.arange(block)
    col = jnp.arange(cfg.head_dim)

    def body(i, carry):
        m, l, acc = carry
        entry = first + i * cfg.pages_per_block + token // cfg.page_size
        listed = entry < end
        page = plgpu.load(pages_ref.at[entry], mask=listed, other=0)
        slot = page * cfg.page_size + token % cfg.page_size
        valid = listed & (slot < length)  # every listed page holds >= 1 valid slot
        rows = (slot[:, None], col[None, :])
        k = plgpu.load(k_ref.at[rows], mask=valid[:, None], other=0)
        s = _dot(q, k.astype(q.dtype), cfg.precise, True) * (cfg.sm_scale * LOG2E)
        s = jnp.where(valid[None, :], s, -jnp.inf)  # log2 units (ptx.py)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = exp2(m - m_new, cfg.interpret)
        p = exp2(s - m_new[:, None], cfg.interpret)
        v = plgpu.load(v_ref.at[rows], mask=valid[:, None], other=0)
        acc = acc * alpha[:, None] + _dot(p.astype(q.dtype), v.astype(q.dtype), cfg.precise)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((cfg.rows,), -jnp.inf, jnp.float32), jnp.zeros((cfg.rows,), jnp.float32),
            jnp.zeros((cfg.rows, cfg.head_dim), jnp.float32))
    m, l, acc = lax.fori_loop(0, n_blocks, body, init)
    plgpu.store(acc_ref.at[pl.ds(0, cfg.rows), :], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[pl.ds(0, cfg.rows)], m * LN2, mask=row_ok)  # natural log for the merge
    plgpu.store(l_ref.at[pl.ds(0, cfg.rows)], l, mask=row_ok)


def _per_head(x):
    rest = x.shape[2:]
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *rest),
                        lambda b, h, *_: (b, h) + (0,) * len(rest))


def _pallas_gpu(q, keys, values, lengths, pages, count, page_size, *, sm_scale, interpret,
                pages_per_block=None, num_splits=None, target_programs=256,
                min_blocks_per_split=2, num_warps=4, num_stages=2):
    b, hq, d = q.shape
    hkv, n_select = keys.shape[1], pages.shape[2]
    group = hq // hkv
    pages_per_block = pages_per_block or max(1, 64 // page_size)
    n_blocks = pl.cdiv(n_select, pages_per_block)
    if num_splits is None:  # enough programs to fill the GPU, each with a few loop steps
        num_splits = min(pl.cdiv(target_programs, b * hkv),
                         pl.cdiv(n_blocks, min_blocks_per_split))
    num_splits = max(1, min(num_splits, n_blocks))
    pages_per_split = pl.cdiv(n_blocks, num_splits) * pages_per_block
    n_splits = pl.cdiv(n_select, pages_per_split)
    cfg = _Config(group=group, rows=max(16, pl.next_power_of_2(group)), head_dim=d,
                  page_size=page_size, pages_per_block=pages_per_block,
                  pages_per_split=pages_per_split,
                  sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
                  precise=q.dtype == jnp.float32, interpret=bool(interpret))
    q4 = q.reshape(b, hkv, group, d)
    scalar = pl.BlockSpec((pl.squeezed, pl.squeezed), lambda i, h, s: (i, h))
    part = lambda *tail: jax.ShapeDtypeStruct((b, hkv, n_splits, group, *tail), jnp.float32)
    out_spec = lambda *tail: pl.BlockSpec((pl.squeezed,) * 3 + (group, *tail),
                                          lambda i, h, s: (i, h, s, 0) + (0,) * len(tail))
    acc, m, l = pl.pallas_call(
        functools.partial(_gpu_kernel, cfg=cfg),
        grid=(b, hkv, n_splits),
        in_specs=[scalar, scalar, _per_head(pages), _per_head(q4), _per_head(keys),
                  _per_head(values)],
        out_specs=[out_spec(d), out_spec(), out_spec()],
        out_shape=[part(d), part(), part()],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="quest_decode_attention",
    )(lengths.astype(jnp.int32), count, pages, q4, keys, values)
    out, lse = merge_splits(acc, m, l, interpret=interpret)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def _tpu_kernel(pages_ref, count_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_scratch, l_scratch, acc_scratch, *, page_size, sm_scale, n_select):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(j < count_ref[b, h])
    def _():
        q = q_ref[...].astype(jnp.float32) * sm_scale  # [G, D]
        k = k_ref[...].astype(jnp.float32)  # [page_size, D]: the page this step's index map read
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        slot = pages_ref[b, h, j] * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(slot < lengths_ref[b, h], s, -jnp.inf)
        m_prev = m_scratch[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_scratch[...] = l_scratch[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_scratch[...] = acc_scratch[...] * alpha + lax.dot_general(
            p, v_ref[...].astype(jnp.float32), (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        m_scratch[...] = m_new

    @pl.when(j == n_select - 1)
    def _():
        l, m = l_scratch[...], m_scratch[...]
        ok = l > 0
        safe = jnp.where(ok, l, 1.0)
        o_ref[...] = jnp.where(ok, acc_scratch[...] / safe, 0.0)
        lse_ref[...] = jnp.where(ok, m + jnp.log(safe), -jnp.inf)


def _pallas_tpu(q, keys, values, lengths, pages, count, page_size, *, sm_scale, interpret):
    b, hq, d = q.shape
    hkv, n_select = keys.shape[1], pages.shape[2]
    group = hq // hkv
    q4 = q.reshape(b, hkv, group, d)
    head = lambda i, h, j, *_: (i, h, 0, 0)
    page_block = pl.BlockSpec((pl.squeezed, pl.squeezed, page_size, d),
                              lambda i, h, j, pages, *_: (i, h, pages[i, h, j], 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hkv, n_select),
        in_specs=[pl.BlockSpec((pl.squeezed, pl.squeezed, group, d), head), page_block,
                  page_block],
        out_specs=[pl.BlockSpec((pl.squeezed, pl.squeezed, group, d), head),
                   pl.BlockSpec((pl.squeezed, pl.squeezed, group, 1), head)],
        scratch_shapes=[pltpu.VMEM((group, 1), jnp.float32), pltpu.VMEM((group, 1), jnp.float32),
                        pltpu.VMEM((group, d), jnp.float32)])
    out, lse = pl.pallas_call(
        functools.partial(_tpu_kernel, page_size=page_size, n_select=n_select,
                          sm_scale=float(d**-0.5 if sm_scale is None else sm_scale)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, group, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, group, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="quest_decode_attention_tpu",
    )(pages, count, lengths.astype(jnp.int32), q4, keys, values)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def pallas_kernel_supports(q, keys, page_size: int) -> str | None:
    """None if the GPU kernel handles these shapes, else the reason it does not."""
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head_dim must be a power of two >= 16, got {d}"
    if page_size & (page_size - 1):
        return f"page_size must be a power of two, got {page_size}"
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"q must be bfloat16 or float32, got {q.dtype}"
    return None


def check_attention_inputs(q, keys, values, lengths, pages, count, page_size: int):
    if q.ndim != 3 or keys.ndim != 4 or keys.shape != values.shape:
        raise UserError(f"q must be [B, Hq, D] and keys/values one [B, Hkv, T, D] shape, got "
                        f"{q.shape}, {keys.shape}, {values.shape}")
    b, hkv, t, d = keys.shape
    if q.shape[0] != b or q.shape[2] != d or q.shape[1] % hkv:
        raise UserError(f"q {q.shape} does not fit the cache {keys.shape}")
    if t % page_size:
        raise UserError(f"cache slots ({t}) must be a multiple of the page size ({page_size})")
    if lengths.shape != (b, hkv) or count.shape != (b, hkv) or pages.shape[:2] != (b, hkv):
        raise UserError(f"lengths, count must be [B, Hkv] and pages [B, Hkv, K]; got "
                        f"{lengths.shape}, {count.shape}, {pages.shape}")


def quest_decode_attention(q, keys, values, lengths, pages, count, page_size: int, *,
                           sm_scale: float | None = None, key_positions=None,
                           query_positions=None, sliding_window: int | None = None,
                           implementation: str | None = None, interpret: bool = False,
                           **kernel_options):
    """Decode attention of q [B, Hq, D] over the selected pages of keys/values [B, Hkv, T, D].

    Same arguments and results as `quest_decode_attention_reference` (out float32 [B, Hq, D],
    lse float32 [B, Hq]), plus:
      implementation: "pallas_gpu", "pallas_tpu" or "reference"; None picks the GPU kernel on a
        GPU backend (shapes it supports, no sliding window), else the reference.
      interpret: run the chosen Pallas kernel in interpret mode (CPU tests).
      kernel_options (GPU): pages_per_block, num_splits (or target_programs and
        min_blocks_per_split, which choose it), num_warps, num_stages.
    """
    check_attention_inputs(q, keys, values, lengths, pages, count, page_size)

    def auto() -> str:
        supported = pallas_kernel_supports(q, keys, page_size) is None
        on_gpu = jax.default_backend() == "gpu" and supported
        return "pallas_gpu" if (interpret or on_gpu) and sliding_window is None else "reference"

    def no_window() -> str | None:
        if sliding_window is None:
            return None
        return "the Quest kernels have no sliding window; use implementation='reference'"

    impl = choose_implementation(
        implementation, IMPLEMENTATIONS, auto=auto,
        refusals={
            "pallas_tpu": no_window,
            "pallas_gpu": lambda: no_window() or cannot_run(
                "Pallas", pallas_kernel_supports(q, keys, page_size)),
        })
    if impl == "reference":
        return quest_decode_attention_reference(
            q, keys, values, lengths, pages, count, page_size, sm_scale=sm_scale,
            key_positions=key_positions, query_positions=query_positions,
            sliding_window=sliding_window)
    if impl == "pallas_tpu":
        return _pallas_tpu(q, keys, values, lengths, pages, count, page_size, sm_scale=sm_scale,
                           interpret=interpret)
    return _pallas_gpu(q, keys, values, lengths, pages, count, page_size, sm_scale=sm_scale,
                       interpret=interpret, **kernel_options)
