"""Pallas Triton decode attention over a bit-packed quantized KV segment (flash-decoding).

Computes exactly what `quantized_attention_reference.quantized_decode_attention_reference`
documents, without ever writing a dequantized K or V to device memory:

- grid (batch, kv-head, split): each program owns one kv-head and one slice of `split` cache
  slots; the `Hq // Hkv` query heads of that kv-head ride along as the rows of one matrix, so
  the packed K/V of a head are read once per step, never once per query head.
- inside a program a loop walks `block` slots at a time: masked loads of the packed codes and
  their scales (slots >= length read as 0), dequantisation in registers, two small matrix
  products on the tensor cores and an online softmax (running max, sum and accumulator);
- 2- and 4-bit codes with bf16 products (`dequant="ptx"`, the default for bf16 q) are
  dequantised by inline PTX straight into bf16 pairs (`ptx.dequantize_planes`) and kept as bit
  planes (plane j = channels j, j + P, ...): q is split into the same planes for the scores
  and the output keeps one accumulator per value plane, so nothing is ever re-interleaved;
  per-token codes of wide heads are read as uint16 byte pairs (`reads_pairs`,
  P = 2 * codes per byte planes), which halves the loads of codes, scales and zeros;
  8-bit and f32 products use jnp float32 arithmetic (`dequant="f32"`);
- per-token scales that cover the whole head (MaxText int8) are folded instead of dequantised:
  the key scale multiplies the scores after q . code, the value scale multiplies the
  probabilities before p @ code; with bf16 q the int8 codes are converted exactly by inline
  PTX, keys into float16 (q . k on float16 tensor cores, q scaled per row into [-1, 1]) and
  values, read as uint32 words, into four bfloat16 byte planes (`int8_ptx_path`);
- each split writes its partial (acc, max, sum); a second small kernel (split_merge.py) merges
  the splits by log-sum-exp into the normalised output and its lse.

Dense bf16/f32 K/V arrays (an exact segment such as the recent window) take the same path with
no dequantisation. Operands and tile loads: quantized_attention_gpu_tiles.py.

Lowering: Pallas Triton (`plgpu.CompilerParams`). JAX 0.11 deprecates that backend in favour
of Mosaic GPU but still runs it.
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

from pallas_kernels.errors import UserError
from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.ptx import LN2, LOG2E, exp2, int8_keys, int8_value_planes
from pallas_kernels.quantized_attention_gpu_tiles import (
    Config,
    Operand,
    bf16x2_path,
    codes_to_f32,
    column_planes,
    dequantized_planes,
    dot,
    expanded,
    int8_ptx_path,
    interleave,
    is_pow2,
    load_rows,
    mma_cast,
    per_slot,
)
from pallas_kernels.split_merge import merge_splits

# JAX 0.11 warns once per lowering that Pallas Triton is deprecated; we know (module docstring).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def pallas_kernel_supports(
    q: jax.Array, k: QuantizedTensor | jax.Array, v: QuantizedTensor | jax.Array
) -> str | None:
    """None if the Pallas kernel handles these shapes, else the reason it does not."""
    d = q.shape[-1]
    if not is_pow2(d) or d < 16:
        return f"head_dim must be a power of two >= 16, got {d}"
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"q must be bfloat16 or float32, got {q.dtype}"
    for name, qt in (("keys", k), ("values", v)):
        if not isinstance(qt, QuantizedTensor):
            continue
        if not is_pow2(qt.group_size):
            return f"{name}: group_size must be a power of two, got {qt.group_size}"
        if qt.granularity == "per_channel" and qt.group_size > 1024:
            return f"{name}: per_channel group_size must be <= 1024, got {qt.group_size}"
    return None


def _scores(q, kc, ks, kz, t0, valid, length, cfg: Config):
    """q [rows, D] (scaled) . keys of slots t0..t0+block -> float32 [rows, block]."""
    op = cfg.k
    if op.raw:
        return dot(q, load_rows(kc, t0, cfg.block, valid), cfg, transpose_b=True)
    if bf16x2_path(op, cfg.dequant):  # q: one [rows, D // P] tile per plane
        planes = dequantized_planes(kc, ks, kz, op, t0, valid, length, cfg)
        return sum(dot(qj, kj, cfg, transpose_b=True) for qj, kj in zip(q, planes))
    if int8_ptx_path(op, cfg.dequant):  # q = (q / |q|_inf as float16, |q|_inf per row)
        q16, norm = q
        codes = int8_keys(load_rows(kc, t0, cfg.block, valid), cfg.interpret)
        s = lax.dot_general(q16, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return s * (norm[:, None] * per_slot(ks, t0, cfg.block, valid))
    codes = codes_to_f32(load_rows(kc, t0, cfg.block, valid), op, cfg.fast_convert)
    if op.folded:  # q . (c * s_t + z_t) = s_t (q . c) + z_t sum(q)
        s = dot(q, codes, cfg, transpose_b=True) * per_slot(ks, t0, cfg.block, valid)
        if op.has_zero:
            qsum = jnp.sum(mma_cast(q, cfg).astype(jnp.float32), axis=1, keepdims=True)
            s = s + qsum * per_slot(kz, t0, cfg.block, valid)
        return s
    k = codes * expanded(ks, op, t0, cfg.block, length)
    if op.has_zero:
        k = k + expanded(kz, op, t0, cfg.block, length)
    return dot(q, k, cfg, transpose_b=True)


def _weighted_values(p, vc, vs, vz, t0, valid, length, cfg: Config):
    """p [rows, block] @ values of slots t0..t0+block -> float32 [rows, D]."""
    op = cfg.v
    if op.raw:
        return dot(p, load_rows(vc, t0, cfg.block, valid), cfg)
    if bf16x2_path(op, cfg.dequant):  # one [rows, D // P] result per plane
        planes = dequantized_planes(vc, vs, vz, op, t0, valid, length, cfg)
        return tuple(dot(p, vj, cfg) for vj in planes)
    if op.words:  # exact bf16 codes, one byte plane per accumulator; p * s keeps bf16's range
        planes = int8_value_planes(load_rows(vc, t0, cfg.block, valid), cfg.interpret)
        w = p * per_slot(vs, t0, cfg.block, valid)
        return tuple(dot(w, x, cfg) for x in planes)
    codes = codes_to_f32(load_rows(vc, t0, cfg.block, valid), op, cfg.fast_convert)
    if op.folded:  # sum_t p_t (c_t * s_t + z_t) = (p * s) @ c + sum_t p_t z_t
        o = dot(p * per_slot(vs, t0, cfg.block, valid), codes, cfg)
        if op.has_zero:
            o = o + jnp.sum(p * per_slot(vz, t0, cfg.block, valid), axis=1, keepdims=True)
        return o
    v = codes * expanded(vs, op, t0, cfg.block, length)
    if op.has_zero:
        v = v + expanded(vz, op, t0, cfg.block, length)
    return dot(p, v, cfg)


def _kernel(length_ref, q_ref, *refs, cfg: Config):
    refs = list(refs)
    kc, ks = refs.pop(0), None if cfg.k.raw else refs.pop(0)
    kz = refs.pop(0) if cfg.k.has_zero else None
    vc, vs = refs.pop(0), None if cfg.v.raw else refs.pop(0)
    vz = refs.pop(0) if cfg.v.has_zero else None
    acc_ref, m_ref, l_ref = refs

    length = jnp.clip(length_ref[()], 0, kc.shape[0])  # T; here, not as one more XLA op per call
    start = pl.program_id(2) * cfg.split
    n_slots = jnp.clip(length - start, 0, cfg.split)
    n_blocks = (n_slots + cfg.block - 1) // cfg.block
    row_ok = jnp.arange(cfg.rows) < cfg.group_q
    q_rows, q_ok = pl.ds(0, cfg.rows), row_ok[:, None]
    if bf16x2_path(cfg.k, cfg.dequant):
        q = column_planes(q_ref, q_rows, q_ok, cfg.k.planes, cfg.interpret)
    else:
        q = plgpu.load(q_ref.at[q_rows, :], mask=q_ok, other=0)
    scale = cfg.sm_scale * LOG2E  # scores, maxima and sums in log2 units (ptx.py)
    if int8_ptx_path(cfg.k, cfg.dequant):  # float16 products: rows scaled into [-1, 1]
        q = q.astype(jnp.float32) * scale
        norm = jnp.max(jnp.abs(q), axis=1)
        norm = jnp.where(norm > 0, norm, 1.0)
        q = ((q / norm[:, None]).astype(jnp.float16), norm)
    else:
        q = jax.tree.map(lambda x: mma_cast(x.astype(jnp.float32) * scale, cfg), q)
    v_planes = cfg.v.planes if bf16x2_path(cfg.v, cfg.dequant) or cfg.v.words else 1

    def body(i, carry):
        m, l, acc = carry
        t0 = start + i * cfg.block
        valid = t0 + jnp.arange(cfg.block) < length
        s = _scores(q, kc, ks, kz, t0, valid, length, cfg)
        s = jnp.where(valid[None, :], s, -jnp.inf)  # every block run has >= 1 valid slot
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = exp2(m - m_new, cfg.interpret)
        p = exp2(s - m_new[:, None], cfg.interpret)
        l = l * alpha + jnp.sum(p, axis=1)
        pv = _weighted_values(p, vc, vs, vz, t0, valid, length, cfg)
        acc = jax.tree.map(lambda a, o: a * alpha[:, None] + o, acc, pv)
        return m_new, l, acc

    init = (
        jnp.full((cfg.rows,), -jnp.inf, jnp.float32),
        jnp.zeros((cfg.rows,), jnp.float32),
        jnp.zeros((cfg.rows, cfg.head_dim), jnp.float32)
        if v_planes == 1
        else tuple(jnp.zeros((cfg.rows, cfg.head_dim // v_planes), jnp.float32) for _ in range(v_planes)),
    )
    m, l, acc = lax.fori_loop(0, n_blocks, body, init)
    if v_planes == 1:
        plgpu.store(acc_ref.at[q_rows, :], acc, mask=q_ok)
    elif cfg.interpret:  # interpret mode has no strided stores
        plgpu.store(acc_ref.at[q_rows, :], interleave(list(acc)), mask=q_ok)
    else:
        width = cfg.head_dim // v_planes
        for j, a in enumerate(acc):
            plgpu.store(acc_ref.at[q_rows, pl.ds(j, width, stride=v_planes)], a, mask=q_ok)
    plgpu.store(m_ref.at[q_rows], m * LN2, mask=row_ok)  # natural-log units for the merge
    plgpu.store(l_ref.at[q_rows], l, mask=row_ok)


# ----------------------------------------------------------------------------- wrapper


def _default_tuning(batch_heads: int, k: Operand, v: Operand, mma: str) -> dict:
    """Block, programs and warps where the caller gives none: the fastest measured on an H200.

    With many (sequence, kv-head) pairs, blocks of 128 slots and 1,024 programs beat 64 and 512;
    with few they lose (more splits make the merge slower), so narrow batches keep 64 and 512.
    Per-channel KIVI keys run best on 2 warps. The sweep: docs/kernels.md, section "H200 run
    (2026-12-03): int8 through PTX, slot vectors, tuned defaults".
    """
    # larger (or float32) tiles could overflow shared memory; they were not measured either
    wide = batch_heads >= 64 and k.head_dim <= 128 and mma == "bf16"
    kivi = "per_channel" in (k.granularity, v.granularity)
    return dict(
        block=128 if wide else 64,
        target_programs=1024 if wide else 512,
        num_warps=2 if kivi else 4,
    )


def _choose_split(batch, kv_heads, slots, block, num_splits, target_programs):
    """Slots per program: enough programs to fill the GPU, each a whole number of blocks."""
    n_blocks = pl.cdiv(slots, block)
    if num_splits is None:
        num_splits = pl.cdiv(target_programs, batch * kv_heads)
    num_splits = max(1, min(num_splits, n_blocks))
    split = pl.cdiv(n_blocks, num_splits) * block
    return split, pl.cdiv(slots, split)


def _per_head_spec(x):
    """The whole [T, ...] slab of one (batch, kv-head) for every program of that pair."""
    rest = x.shape[2:]
    return pl.BlockSpec(
        (pl.squeezed, pl.squeezed, *rest), lambda b, h, s: (b, h) + (0,) * len(rest)
    )


def pallas_gpu(
    q,
    k: QuantizedTensor,
    v: QuantizedTensor,
    length,
    *,
    sm_scale,
    interpret,
    block=None,
    num_splits=None,
    target_programs=None,
    num_warps=None,
    num_stages=3,
    fast_convert=True,
    mma=None,
    dequant=None,
    pairs=True,
):
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    gq = hq // hkv
    if mma is None:
        mma = "f32" if q.dtype == jnp.float32 else "bf16"
    if dequant is None:
        dequant = "ptx" if mma == "bf16" else "f32"
    if dequant not in ("ptx", "f32") or (dequant == "ptx" and mma != "bf16"):
        raise UserError(f"dequant must be 'f32', or 'ptx' with bf16 products; got {dequant!r}")
    k_op, v_op = (Operand.of(x, dequant, pairs) for x in (k, v))
    v_op = dataclasses.replace(v_op, words=int8_ptx_path(v_op, dequant))
    align = max(op.group_size if op.granularity == "per_channel" else 1 for op in (k_op, v_op))
    tuned = _default_tuning(b * hkv, k_op, v_op, mma)
    block = block or max(tuned["block"], align)
    target_programs = target_programs or tuned["target_programs"]
    num_warps = num_warps or tuned["num_warps"]
    if not is_pow2(block) or block % align:
        raise UserError(f"block must be a power of two and a multiple of {align}, got {block}")
    split, n_splits = _choose_split(b, hkv, t, block, num_splits, target_programs)
    cfg = Config(
        group_q=gq,
        rows=max(16, pl.next_power_of_2(gq)),
        head_dim=d,
        block=block,
        split=split,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        mma=mma,
        fast_convert=fast_convert,
        dequant=dequant,
        interpret=bool(interpret),
        k=k_op,
        v=v_op,
    )

    def arrays(x, op: Operand):  # int8 bits are read as uint8 and re-centred in the kernel
        if op.raw:
            return [x]
        codes = lax.bitcast_convert_type(x.codes, jnp.uint8) if x.signed else x.codes
        if op.pairs or op.words:  # little-endian: byte b of a pair or word is bits [8b, 8b + 8)
            width = jnp.uint32 if op.words else jnp.uint16
            codes = lax.bitcast_convert_type(
                codes.reshape(*codes.shape[:-1], -1, jnp.dtype(width).itemsize), width
            )
        params = [x.scale] + ([x.zero] if x.zero is not None else [])
        if op.folded:  # [..., T, 1] -> [..., T]: read as vectors by `per_slot`
            params = [a[..., 0] for a in params]
        return [codes, *params]

    operands = arrays(k, cfg.k) + arrays(v, cfg.v)
    q4 = q.reshape(b, hkv, gq, d)

    part = lambda *tail: jax.ShapeDtypeStruct((b, hkv, n_splits, gq, *tail), jnp.float32)
    out_spec = lambda *tail: pl.BlockSpec(
        (pl.squeezed,) * 3 + (gq, *tail), lambda i, h, s: (i, h, s, 0) + (0,) * len(tail)
    )
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(b, hkv, n_splits),
        in_specs=[pl.BlockSpec((pl.squeezed,), lambda i, h, s: (i,)), _per_head_spec(q4)]
        + [_per_head_spec(x) for x in operands],
        out_specs=[out_spec(d), out_spec(), out_spec()],
        out_shape=[part(d), part(), part()],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="quantized_decode_attention",
    )(length.astype(jnp.int32), q4, *operands)
    out, lse = merge_splits(acc, m, l, interpret=interpret)
    return out.reshape(b, hq, d), lse.reshape(b, hq)
