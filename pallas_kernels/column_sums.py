"""Pallas GPU kernel for the column sums of a causal prefill's attention (H2O's scores).

Computes what `column_sums_reference.attention_column_sums_reference` documents. The prefill's
own attention stays cuDNN's fused kernel, which also returns each query's log-sum-exp; this
kernel then recomputes the scores once, turns them into probabilities with that log-sum-exp
(no online softmax, nothing rescaled) and sums them down the columns, like the key-side loop of
a flash-attention backward pass:

- grid (batch, kv-head, key block): each program owns `block_k` keys of one kv-head;
- the query heads of the group are rows of one matrix (the wrapper lays q out as
  [B, Hkv, T * G, D], row t * G + h), so each loop step is one `[block_rows, D] @ [D, block_k]`
  product on the tensor cores (bf16 operands, float32 accumulation) covering block_rows / G
  queries of every head of the group;
- the loop walks the query blocks that can see the program's keys (from the block holding the
  first key to the prompt's length, or to the end of the sliding window); probabilities are
  `ex2.approx` of the scores (in log2 units) minus the log-sum-exp; only the blocks that straddle
  the diagonal, the length or the window are masked;
- they add up in a `[block_rows, block_k]` float32 tile whose rows are summed once, after the
  loop; no T x T matrix and no probabilities reach memory; the output is [B, Hkv, T] float32.

Cost: one more Q K^T pass and one more exponential per visible score, about half the FLOPs of
the attention forward pass; timings against cuDNN's attention: docs/kernels.md, section
"Attention column sums". The dispatcher picks the kernel on a GPU backend
for 16-bit q and the reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import cannot_run, choose_implementation
from pallas_kernels.errors import UserError
from pallas_kernels.ptx import LOG2E, exp2
from pallas_kernels.column_sums_reference import (
    attention_column_sums_reference,
    check_column_sum_inputs,
)

IMPLEMENTATIONS = ("reference", "pallas_gpu")

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

@dataclasses.dataclass(frozen=True)
class _Config:
    group: int  # query heads per kv-head
    head_dim: int
    block_q: int  # queries per loop step (block_q * group rows of the score tile)
    block_k: int  # keys per program
    window: int | None
    interpret: bool


def _kernel(length_ref, q_ref, k_ref, lse_ref, out_ref, *, cfg: _Config):
    """q_ref [T * G, D] (row t * G + h: query t, head h of the group), k_ref [T, D], lse_ref
    [T * G] (in log2 units, same rows), out_ref [block_k]."""
    length = length_ref[()]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    j0 = pl.program_id(2) * bk
    keys = j0 + jnp.arange(bk)
    k = plgpu.load(k_ref.at[pl.ds(j0, bk), :], mask=(keys < length)[:, None], other=0)
    scale = cfg.head_dim**-0.5 * LOG2E

    def step(i, acc, masked: bool):
        queries = i * bq + jnp.arange(bq * g) // g
        rows_ok = queries < length
        rows = pl.ds(i * bq * g, bq * g)
        q = plgpu.load(q_ref.at[rows, :], mask=rows_ok[:, None], other=0)
        lse = plgpu.load(lse_ref.at[rows], mask=rows_ok, other=0.0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        p = exp2(s * scale - lse[:, None], cfg.interpret)
        if masked:
            seen = (keys[None, :] <= queries[:, None]) & rows_ok[:, None]
            if cfg.window is not None:
                seen &= queries[:, None] - keys[None, :] < cfg.window
            p = jnp.where(seen, p, 0.0)
        return acc + p

    # Query blocks that can see this key block: [first, last). Those in [lo, hi) see all of it
    # (past the diagonal, inside the length and the window) and skip the mask.
    first = j0 // bq
    last = pl.cdiv(length, bq)
    hi = length // bq
    if cfg.window is not None:
        last = jnp.minimum(last, pl.cdiv(j0 + bk - 1 + cfg.window, bq))
        hi = jnp.minimum(hi, (j0 + cfg.window) // bq)
    lo = jnp.clip(pl.cdiv(j0 + bk - 1, bq), first, last)
    hi = jnp.clip(hi, lo, last)
    # Probabilities add up in a [block_q * G, block_k] tile whose rows are summed once, at the
    # end (a per-step reduction across the rows would cross warps through shared memory).
    acc = jnp.zeros((bq * g, bk), jnp.float32)
    acc = lax.fori_loop(first, lo, functools.partial(step, masked=True), acc)
    acc = lax.fori_loop(lo, hi, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(hi, last, functools.partial(step, masked=True), acc)
    out_ref[...] = jnp.sum(acc, axis=0)


def _pallas_gpu(q, k, lse, lengths, *, window, interpret, block_rows=64, block_k=128,
                num_warps=8, num_stages=3):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    if block_rows % group or not _is_pow2(block_rows // group):
        raise UserError(f"block_rows must be a power-of-two multiple of the group ({group}), "
                        f"got {block_rows}")
    cfg = _Config(group=group, head_dim=d, block_q=block_rows // group, block_k=block_k,
                  window=window, interpret=interpret)
    n_blocks = pl.cdiv(t, block_k)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)
    # The group's query heads become rows of one matrix: [B, Hkv, T * G, D] (a copy of q, small
    # next to the T^2 work).
    q_rows = q.reshape(b, t, hkv, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * group, d)
    lse_rows = (lse.astype(jnp.float32) * LOG2E).reshape(b, t, hkv, group)
    lse_rows = lse_rows.transpose(0, 2, 1, 3).reshape(b, hkv, t * group)
    slab = lambda *rest: pl.BlockSpec(  # the whole [T (* G), ...] of one (batch, kv-head)
        (pl.squeezed, pl.squeezed, *rest), lambda i, h, j: (i, h) + (0,) * len(rest))
    sums = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(b, hkv, n_blocks),
        in_specs=[pl.BlockSpec((pl.squeezed,), lambda i, h, j: (i,)),
                  slab(t * group, d),
                  pl.BlockSpec((pl.squeezed, t, pl.squeezed, d), lambda i, h, j: (i, 0, h, 0)),
                  slab(t * group)],
        out_specs=pl.BlockSpec((pl.squeezed, pl.squeezed, block_k), lambda i, h, j: (i, h, j)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, n_blocks * block_k), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="attention_column_sums",
    )(lengths, q_rows, k, lse_rows)
    return sums[:, :, :t]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pallas_kernel_supports(q) -> str | None:
    """None if the Pallas kernel handles these shapes, else the reason it does not."""
    d = q.shape[-1]
    if d < 16 or not _is_pow2(d):
        return f"head_dim must be a power of two >= 16, got {d}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"q must be bfloat16 or float16, got {q.dtype}"
    return None


def attention_column_sums(q, k, lse, lengths, *, window: int | None = None,
                          implementation: str | None = None, interpret: bool = False,
                          **kernel_options):
    """Column sums [B, Hkv, T] float32 of a causal prefill's softmax, summed over the valid
    queries and the query heads of each group (see `column_sums_reference`).

    Args:
      q [B, T, Hq, D], k [B, T, Hkv, D]: the prefill's post-RoPE queries and keys.
      lse [B, T, Hq] float32: each query's log-sum-exp (natural log) of its scaled scores.
      lengths [B] int32: valid tokens per row.
      window: the sliding window, if any (key j seen by query i when i - window < j <= i).
      implementation: "pallas_gpu" or "reference"; None picks the kernel on a GPU backend for
        16-bit q with a power-of-two head_dim, else the reference.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      **kernel_options: block_rows (query rows, i.e. queries x group heads, per loop step),
        block_k (keys per program), num_warps, num_stages.
    """
    check_column_sum_inputs(q, k, lse, lengths)

    def auto() -> str:
        on_gpu = interpret or jax.default_backend() == "gpu"
        return "pallas_gpu" if on_gpu and pallas_kernel_supports(q) is None else "reference"

    impl = choose_implementation(
        implementation, IMPLEMENTATIONS, auto=auto,
        refusals={"pallas_gpu": lambda: cannot_run("Pallas", pallas_kernel_supports(q))})
    if impl == "reference":
        return attention_column_sums_reference(q, k, lse, lengths, window=window)
    return _pallas_gpu(q, k, lse, lengths, window=window, interpret=interpret, **kernel_options)
