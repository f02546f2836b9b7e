"""Decode attention over a MaxText int8 cache as a Pallas Mosaic GPU kernel (Hopper, JAX >= 0.11).

Computes what `quantized_attention_reference.quantized_decode_attention_reference` documents for
int8 K and V with one absmax scale per token and head (`QuantizedTensor.int8`), like the Pallas
Triton kernel in quantized_attention.py, but built on Hopper's asynchronous copies (TMA) and
warpgroup matrix products (wgmma) so that a batch-1 step reads its bytes near the HBM's speed:

- grid (batch x kv-head, split); one warpgroup per program walks its split `block` slots at a
  time through a ring of `stages` shared-memory buffers that TMA refills (K and V codes into
  128-byte-swizzled tiles, their per-token scales beside them);
- the scores are computed transposed, S^T [block, 8] = K q^T, as an s8 x s8 -> s32 wgmma that
  reads K's codes straight from shared memory: nothing converts the keys. q enters as two int8
  levels, q ~ hi * s + lo * s / 254 with s = max|q_row| / 127 (|error| <= s / 508, about 2^-15
  of the row's largest entry, far below bf16's 2^-9), split inside the kernel; the two levels'
  products are combined in float32, then the key scales multiply S^T's rows;
- an online softmax down S^T's slot axis in log2 units (log2(e) folded into the scale);
- values: V's codes are converted to bf16 into shared memory (wgmma takes 8-bit operands only
  K-major, and V is slot-major), the probabilities times the value scales are stored transposed
  as bf16, and out^T [D, 8] += V^T P^T (bf16 x bf16 -> f32);
- each split writes its partial; `split_merge.merge_splits` merges them by log-sum-exp. The
  float32 partial out^T leaves as two bf16 halves of out (hi + lo, 16 significant bits) because
  Mosaic GPU (JAX 0.11.2) lowers transposed stores of bf16 register tiles but not of float32.

The query heads of a kv-head (at most 8) are the 8 columns of S^T: GQA is one pass over the
kv-head's bytes. Measured against the Triton kernel in docs/kernels.md, section "H200 run
(2026-12-04, night)"; `quantized_attention.py` picks it on Hopper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ptx import LN2, LOG2E
from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.split_merge import merge_splits

_COLUMNS = 8  # query heads per kv-head, padded: wgmma's N
_Q_ROWS = 64  # q is split in a [64, D] register tile (the smallest WGMMA-layout tile)
# The kernel was written and checked against JAX 0.11's Mosaic GPU, which also brought its CPU
# interpreter (`InterpretGPUParams`): that attribute tells 0.11 from 0.10.
JAX_HAS_MOSAIC_INTERPRETER = hasattr(plgpu, "InterpretGPUParams")


def on_hopper() -> bool:
    """True when JAX's first device is a Hopper GPU (compute capability 9.x)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")


def mosaic_int8_supports(q: jax.Array, k, v) -> str | None:
    """None if the Mosaic GPU int8 kernel handles these inputs, else the reason it does not."""
    if not JAX_HAS_MOSAIC_INTERPRETER:
        return f"needs JAX >= 0.11 (Mosaic GPU's wgmma and layouts as checked), got {jax.__version__}"
    if not all(isinstance(x, QuantizedTensor) and x.signed for x in (k, v)):
        return "keys and values must be MaxText int8 (QuantizedTensor.int8)"
    b, hq, d = q.shape
    if d != 128:
        return f"head_dim must be 128 (one 128-byte swizzled row of int8 codes), got {d}"
    if q.dtype != jnp.bfloat16:
        return f"q must be bfloat16, got {q.dtype}"
    if hq // k.shape[1] > _COLUMNS:
        return f"at most {_COLUMNS} query heads per kv-head, got {hq // k.shape[1]}"
    return None


def _tiled(dtype):
    """Tiling and 128-byte swizzle of a 2-D shared-memory operand with 128-byte rows."""
    return (
        plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(128),
    )


def mosaic_int8_attention(
    q: jax.Array,
    k: QuantizedTensor,
    v: QuantizedTensor,
    length: jax.Array,
    *,
    sm_scale: float | None = None,
    block: int = 64,
    target_programs: int = 256,
    stages: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q [B, Hq, D] bf16 over int8 K/V [B, Hkv, T, D] -> out [B, Hq, D], lse [B, Hq] (float32).

    block: slots per loop step; target_programs: (sequence, kv-head, split) programs to aim for
    (the splits are whole blocks); stages: ring buffers in flight. Defaults: the fastest on an
    H200 at batch 1 (docs/kernels.md).
    """
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g, bh = hq // hkv, b * hkv
    n_blocks = pl.cdiv(t, block)
    n_splits = max(1, min(n_blocks, pl.cdiv(target_programs, bh)))
    per_split = pl.cdiv(n_blocks, n_splits) * block
    n_splits = pl.cdiv(t, per_split)
    scale = float(d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    n = _COLUMNS
    wgmma_rows = plgpu.Layout.WGMMA.reduce(1)  # one value per slot (row of S^T)
    wgmma_cols = plgpu.Layout.WGMMA.reduce(0)  # one value per query column

    def split_q(q_ref, row, q8_smem, qs_smem, q_bar, start_copies):
        """q's g rows -> int8 codes: rows [0, g) high level, rows [8, 8 + g) low level."""

        def body(qf_smem):
            plgpu.copy_gmem_to_smem(q_ref.at[row], qf_smem.at[pl.ds(0, g)], q_bar)
            plgpu.copy_gmem_to_smem(q_ref.at[row], qf_smem.at[pl.ds(n, g)], q_bar)
            start_copies()
            plgpu.barrier_wait(q_bar)
            x = plgpu.load(qf_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            r = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA)
            x = jnp.where((r < g) | ((r >= n) & (r < n + g)), x, 0.0)  # the rest is not q
            amax = jnp.max(jnp.abs(x), axis=1)
            s = jnp.where(amax > 0, amax * (1.0 / 127), 1.0)
            s_rows = lax.broadcast_in_dim(s, x.shape, [0])
            inv_rows = lax.broadcast_in_dim(1.0 / s, x.shape, [0])
            hi = jnp.round(x * inv_rows)
            lo = jnp.clip(jnp.round((x - hi * s_rows) * (254.0 * inv_rows)), -127.0, 127.0)
            q8_smem[...] = jnp.where(r < n, hi, lo).astype(jnp.int8)
            qs_smem[...] = s
            plgpu.commit_smem()

        pl.run_scoped(body, plgpu.SMEM((_Q_ROWS, d), jnp.bfloat16))

    def kernel(len_ref, q_ref, kc_ref, ks_ref, vc_ref, vs_ref,
               acc_hi_ref, acc_lo_ref, m_ref, l_ref,
               q8_smem, qs_smem, k8, v8, ks_smem, vs_smem, pt, oh_smem, ol_smem, m_smem, l_smem,
               q_bar, bar):  # fmt: skip
        row = lax.axis_index("row")
        split = lax.axis_index("split")
        length = jnp.clip(len_ref[row // hkv], 0, t)
        start = split * per_split
        n_steps = (jnp.clip(length - start, 0, per_split) + block - 1) // block

        def fetch(i, slot):
            slots = pl.ds(start + i * block, block)
            plgpu.copy_gmem_to_smem(kc_ref.at[row, slots], k8.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(ks_ref.at[row, slots], ks_smem.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(vc_ref.at[row, slots], v8.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(vs_ref.at[row, slots], vs_smem.at[slot], bar.at[slot])

        def start_copies():
            for i in range(stages):
                pl.when(i < n_steps)(functools.partial(fetch, i, i))

        split_q(q_ref, row, q8_smem, qs_smem, q_bar, start_copies)
        q_hi_scale = plgpu.load(qs_smem.at[pl.ds(0, n)], layout=wgmma_cols) * scale
        q_lo_scale = q_hi_scale * (1.0 / 254)
        per_slot = lambda x: lax.broadcast_in_dim(x, (block, n), [0])
        per_column = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])

        def scores(hi_ref, lo_ref, slot):
            plgpu.wgmma(hi_ref, k8.at[slot], q8_smem.at[pl.ds(0, n)].T)
            plgpu.wgmma(lo_ref, k8.at[slot], q8_smem.at[pl.ds(n, n)].T)
            hi, lo = hi_ref[...].astype(jnp.float32), lo_ref[...].astype(jnp.float32)
            return hi * per_column(q_hi_scale, hi.shape) + lo * per_column(q_lo_scale, lo.shape)

        def values(acc_ref, vb):
            plgpu.wgmma(acc_ref, vb.T, pt.T)
            return acc_ref[...]

        def step(i, carry, vb):
            m, l_cols, acc = carry
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(bar.at[slot])
            s = pl.run_scoped(
                functools.partial(scores, slot=slot),
                plgpu.ACC((block, n), jnp.int32),
                plgpu.ACC((block, n), jnp.int32),
            )
            k_scale = plgpu.load(ks_smem.at[slot], layout=wgmma_rows).astype(jnp.float32)
            v_scale = plgpu.load(vs_smem.at[slot], layout=wgmma_rows).astype(jnp.float32)
            slot_ids = plgpu.broadcasted_iota(jnp.int32, (block, n), 0, layout=plgpu.Layout.WGMMA)
            valid = start + i * block + slot_ids < length
            s = jnp.where(valid, s * per_slot(k_scale), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=0))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - per_column(m_new, s.shape))
            l_cols = l_cols * per_column(alpha, s.shape) + p  # summed over slots at the end
            p = jnp.where(valid, p * per_slot(v_scale), 0.0)
            vb[...] = plgpu.load(v8.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.bfloat16)
            pt.T[...] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()  # also: every thread is done reading this slot
            pl.when(i + stages < n_steps)(lambda: fetch(i + stages, slot))
            pv = pl.run_scoped(functools.partial(values, vb=vb), plgpu.ACC((d, n), jnp.float32))
            return m_new, l_cols, acc * per_column(alpha, acc.shape) + pv

        init = (
            plgpu.layout_cast(jnp.full((n,), -jnp.inf, jnp.float32), wgmma_cols),
            plgpu.layout_cast(jnp.zeros((block, n), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.zeros((d, n), jnp.float32), plgpu.Layout.WGMMA),
        )
        m, l_cols, acc = pl.run_scoped(  # the bf16 V buffer reuses split_q's space
            lambda vb: lax.fori_loop(0, n_steps, functools.partial(step, vb=vb), init),
            plgpu.SMEM((block, d), jnp.bfloat16, transforms=_tiled(jnp.bfloat16)),
        )
        acc_hi = acc.astype(jnp.bfloat16)
        oh_smem.T[...] = acc_hi
        ol_smem.T[...] = (acc - acc_hi.astype(jnp.float32)).astype(jnp.bfloat16)
        m_smem[...] = m * LN2  # natural-log units for the merge
        l_smem[...] = l_cols.sum(axis=0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(oh_smem, acc_hi_ref.at[row, split])
        plgpu.copy_smem_to_gmem(ol_smem, acc_lo_ref.at[row, split])
        plgpu.copy_smem_to_gmem(m_smem, m_ref.at[row, split])
        plgpu.copy_smem_to_gmem(l_smem, l_ref.at[row, split])
        plgpu.wait_smem_to_gmem(0)

    ks, vs = (x.scale.reshape(bh, t) for x in (k, v))
    acc_hi, acc_lo, m, l = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((bh, n_splits, n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((bh, n_splits, n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((bh, n_splits, n), jnp.float32),
            jax.ShapeDtypeStruct((bh, n_splits, n), jnp.float32),
        ),
        scratch_types=[
            plgpu.SMEM((_Q_ROWS, d), jnp.int8, transforms=_tiled(jnp.int8)),
            plgpu.SMEM((_Q_ROWS,), jnp.float32),
            plgpu.SMEM((stages, block, d), jnp.int8, transforms=_tiled(jnp.int8)),
            plgpu.SMEM((stages, block, d), jnp.int8, transforms=_tiled(jnp.int8)),
            plgpu.SMEM((stages, block), ks.dtype),
            plgpu.SMEM((stages, block), vs.dtype),
            plgpu.SMEM((n, block), jnp.bfloat16, transforms=_tiled(jnp.bfloat16)),
            plgpu.SMEM((n, d), jnp.bfloat16, transforms=_tiled(jnp.bfloat16)),
            plgpu.SMEM((n, d), jnp.bfloat16, transforms=_tiled(jnp.bfloat16)),
            plgpu.SMEM((n,), jnp.float32),
            plgpu.SMEM((n,), jnp.float32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=4, num_barriers=stages),
        ],
        grid=(bh, n_splits),
        grid_names=("row", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(
        length.astype(jnp.int32),
        q.reshape(bh, g, d),
        k.codes.reshape(bh, t, d),
        ks,
        v.codes.reshape(bh, t, d),
        vs,
    )
    parts = lambda x: x.reshape(b, hkv, n_splits, *x.shape[2:])
    out, lse = merge_splits(
        parts(acc_hi), parts(m), parts(l), acc_low=parts(acc_lo), heads=g, interpret=interpret
    )
    return out.reshape(b, hq, d), lse.reshape(b, hq)
