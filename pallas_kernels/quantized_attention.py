"""Pallas decode attention over a bit-packed quantized KV segment (flash-decoding).

Computes exactly what `quantized_attention_reference.quantized_decode_attention_reference`
documents, without ever writing a dequantized K or V to device memory:

- grid (batch, kv-head, split): each program owns one kv-head and one slice of `split` cache
  slots; the `Hq // Hkv` query heads of that kv-head ride along as the rows of one matrix, so
  the packed K/V of a head are read once per step, never once per query head.
- inside a program a loop walks `block` slots at a time: masked loads of the packed codes and
  their scales (slots >= length read as 0), shift-and-mask unpacking, dequantisation in
  registers, two small matrix products on the tensor cores and an online softmax (running max,
  sum and accumulator);
- per-token scales that cover the whole head (MaxText int8) are folded instead of dequantised:
  the key scale multiplies the scores after q . code, the value scale multiplies the
  probabilities before p @ code;
- each split writes its partial (acc, max, sum); a tiny plain-JAX pass merges the splits by
  log-sum-exp into the normalised output and its lse.

Dense bf16/f32 K/V arrays (an exact segment such as the recent window) take the same path with
no dequantisation.

GPU lowering: Pallas Triton (`plgpu.CompilerParams`). JAX 0.11 deprecates that backend in favour
of Mosaic GPU but still runs it; a Mosaic GPU port is future work (see docs/kernels.md).
TPU: the Mosaic TPU variant lives in quantized_attention_tpu.py (`implementation="pallas_tpu"`).
It was checked on a CPU only (TPU interpret mode, Pallas-to-Mosaic lowering), so with
`implementation=None` the dispatcher does not pick it: on TPU it uses the reference.

Performance on an H100 (docs/kernels.md): dense bf16 and int8 at batch 16 run at 88-100% of
the HBM floor; KIVI int4/int2 are bound by the in-register dequantisation (25-40%), and at
batch 1 a fixed 15-30 us (two launches, split merge, pipeline fill) dominates.
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

from engine.errors import UserError
from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.quantized_attention_reference import (
    check_decode_inputs,
    merge_attention_segments,
    quantized_decode_attention_reference,
)
from pallas_kernels.quantized_attention_tpu import pallas_tpu, pallas_tpu_supports

__all__ = [
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
    "merge_attention_segments",
    "pallas_kernel_supports",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("reference", "pallas_gpu", "pallas_tpu")

# JAX 0.11 warns once per lowering that Pallas Triton is deprecated; we know (module docstring).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

_MAGIC = 0x4B000000  # float32 bits of 2**23: (_MAGIC | c) reinterpreted is 2**23 + c, exactly.


@dataclasses.dataclass(frozen=True)
class _Operand:
    """What the kernel needs to know, statically, about a QuantizedTensor."""

    bits: int
    signed: bool
    granularity: str
    group_size: int
    has_zero: bool
    head_dim: int
    raw: bool = False  # a dense bf16/f32 array (an exact segment), no codes or scales

    @property
    def per_byte(self) -> int:
        return 1 if self.signed else 8 // self.bits

    @property
    def folded(self) -> bool:
        """One scale per token for the whole head: fold it into scores / probabilities."""
        return self.granularity == "per_token" and self.group_size == self.head_dim

    @classmethod
    def of(cls, qt: QuantizedTensor | jax.Array) -> _Operand:
        if not isinstance(qt, QuantizedTensor):
            return cls(
                bits=16,
                signed=False,
                granularity="dense",
                group_size=1,
                has_zero=False,
                head_dim=qt.shape[-1],
                raw=True,
            )
        return cls(
            qt.bits, qt.signed, qt.granularity, qt.group_size, qt.zero is not None, qt.head_dim
        )


@dataclasses.dataclass(frozen=True)
class _Config:
    group_q: int  # query heads per kv-head
    rows: int  # group_q padded to the tensor cores' minimum of 16 rows
    head_dim: int
    block: int  # cache slots per loop step
    split: int  # cache slots per program (a multiple of block)
    sm_scale: float
    mma: str  # operand type of the matrix products: "bf16", "tf32" or "f32"
    fast_convert: bool
    k: _Operand
    v: _Operand


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pallas_kernel_supports(
    q: jax.Array, k: QuantizedTensor | jax.Array, v: QuantizedTensor | jax.Array
) -> str | None:
    """None if the Pallas kernel handles these shapes, else the reason it does not."""
    d = q.shape[-1]
    if not _is_pow2(d) or d < 16:
        return f"head_dim must be a power of two >= 16, got {d}"
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"q must be bfloat16 or float32, got {q.dtype}"
    for name, qt in (("keys", k), ("values", v)):
        if not isinstance(qt, QuantizedTensor):
            continue
        if not _is_pow2(qt.group_size):
            return f"{name}: group_size must be a power of two, got {qt.group_size}"
        if qt.granularity == "per_channel" and qt.group_size > 1024:
            return f"{name}: per_channel group_size must be <= 1024, got {qt.group_size}"
    return None


# ----------------------------------------------------------------------------- kernel helpers


def _load_rows(ref, start, n, valid):
    """ref[start:start+n] as an [n, C] tile; rows where `valid` is False read as 0."""
    return plgpu.load(ref.at[pl.ds(start, n), :], mask=valid[:, None], other=0)


def _interleave(planes):
    """[x0, x1, ..., x_{P-1}] each [R, C] -> [R, C * P] with x_j[:, i] at column i * P + j."""

    def nest(ps):
        if len(ps) == 1:
            return ps[0]
        return jnp.stack([nest(ps[0::2]), nest(ps[1::2])], axis=-1)

    if len(planes) == 1:
        return planes[0]
    x = nest(planes)
    return x.reshape(x.shape[0], -1)


def _codes_to_f32(words, op: _Operand, fast: bool):
    """Packed uint8 [R, D // P] -> float32 [R, D] holding the codes (signed for int8)."""
    offset = 0.0
    if op.signed:  # int8 bits viewed as uint8: c = (u ^ 0x80) - 128
        words, offset = words ^ jnp.uint8(0x80), 128.0
    p, mask = op.per_byte, (1 << op.bits) - 1
    if fast:  # integer -> float without the (quarter-rate) conversion instruction
        w = words.astype(jnp.uint32)
        planes = [
            w | _MAGIC if p == 1 else ((w >> (j * op.bits)) & mask) | _MAGIC for j in range(p)
        ]
        f = lax.bitcast_convert_type(_interleave(planes), jnp.float32)
        return f - (float(2**23) + offset)
    planes = [words if p == 1 else (words >> (j * op.bits)) & jnp.uint8(mask) for j in range(p)]
    f = _interleave(planes).astype(jnp.float32)
    return f - offset if offset else f


def _expanded(ref, op: _Operand, t0, block, length):
    """Scale or zero of the tile's slots, broadcast to float32 [block, D]."""
    g, d = op.group_size, op.head_dim
    if op.granularity == "per_channel":  # ref [T // g, D]: one row per group of g slots
        ng = block // g
        first = t0 // g + jnp.arange(ng)
        x = _load_rows(ref, t0 // g, ng, first * g < length).astype(jnp.float32)
        return jnp.broadcast_to(x[:, None, :], (ng, g, d)).reshape(block, d)
    valid = t0 + jnp.arange(block) < length  # per_token: ref [T, D // g]
    x = _load_rows(ref, t0, block, valid).astype(jnp.float32)
    return jnp.broadcast_to(x[:, :, None], (block, d // g, g)).reshape(block, d)


def _per_slot(ref, t0, block, valid):
    """Folded per-token scale or zero: ref [T, 1] -> float32 [1, block]."""
    return _load_rows(ref, t0, block, valid).astype(jnp.float32).reshape(1, block)


def _mma_cast(x, cfg: _Config):
    return x.astype(jnp.bfloat16) if cfg.mma == "bf16" else x.astype(jnp.float32)


def _dot(a, b, cfg: _Config, transpose_b=False):
    """a [M, K] @ b [K, N] (or b [N, K] transposed) with float32 accumulation."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if cfg.mma == "f32" else None  # else TF32 / bf16 MMA
    return lax.dot_general(
        _mma_cast(a, cfg),
        _mma_cast(b, cfg),
        dims,
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _scores(q, kc, ks, kz, t0, valid, length, cfg: _Config):
    """q [rows, D] (scaled) . keys of slots t0..t0+block -> float32 [rows, block]."""
    op = cfg.k
    if op.raw:
        return _dot(q, _load_rows(kc, t0, cfg.block, valid), cfg, transpose_b=True)
    codes = _codes_to_f32(_load_rows(kc, t0, cfg.block, valid), op, cfg.fast_convert)
    if op.folded:  # q . (c * s_t + z_t) = s_t (q . c) + z_t sum(q)
        s = _dot(q, codes, cfg, transpose_b=True) * _per_slot(ks, t0, cfg.block, valid)
        if op.has_zero:
            qsum = jnp.sum(_mma_cast(q, cfg).astype(jnp.float32), axis=1, keepdims=True)
            s = s + qsum * _per_slot(kz, t0, cfg.block, valid)
        return s
    k = codes * _expanded(ks, op, t0, cfg.block, length)
    if op.has_zero:
        k = k + _expanded(kz, op, t0, cfg.block, length)
    return _dot(q, k, cfg, transpose_b=True)


def _weighted_values(p, vc, vs, vz, t0, valid, length, cfg: _Config):
    """p [rows, block] @ values of slots t0..t0+block -> float32 [rows, D]."""
    op = cfg.v
    if op.raw:
        return _dot(p, _load_rows(vc, t0, cfg.block, valid), cfg)
    codes = _codes_to_f32(_load_rows(vc, t0, cfg.block, valid), op, cfg.fast_convert)
    if op.folded:  # sum_t p_t (c_t * s_t + z_t) = (p * s) @ c + sum_t p_t z_t
        o = _dot(p * _per_slot(vs, t0, cfg.block, valid), codes, cfg)
        if op.has_zero:
            o = o + jnp.sum(p * _per_slot(vz, t0, cfg.block, valid), axis=1, keepdims=True)
        return o
    v = codes * _expanded(vs, op, t0, cfg.block, length)
    if op.has_zero:
        v = v + _expanded(vz, op, t0, cfg.block, length)
    return _dot(p, v, cfg)


def _kernel(length_ref, q_ref, *refs, cfg: _Config):
    refs = list(refs)
    kc, ks = refs.pop(0), None if cfg.k.raw else refs.pop(0)
    kz = refs.pop(0) if cfg.k.has_zero else None
    vc, vs = refs.pop(0), None if cfg.v.raw else refs.pop(0)
    vz = refs.pop(0) if cfg.v.has_zero else None
    acc_ref, m_ref, l_ref = refs

    length = length_ref[()]
    start = pl.program_id(2) * cfg.split
    n_slots = jnp.clip(length - start, 0, cfg.split)
    n_blocks = (n_slots + cfg.block - 1) // cfg.block
    row_ok = jnp.arange(cfg.rows) < cfg.group_q
    q = plgpu.load(q_ref.at[pl.ds(0, cfg.rows), :], mask=row_ok[:, None], other=0)
    q = _mma_cast(q.astype(jnp.float32) * cfg.sm_scale, cfg)

    def body(i, carry):
        m, l, acc = carry
        t0 = start + i * cfg.block
        valid = t0 + jnp.arange(cfg.block) < length
        s = _scores(q, kc, ks, kz, t0, valid, length, cfg)
        s = jnp.where(valid[None, :], s, -jnp.inf)  # every block run has >= 1 valid slot
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _weighted_values(p, vc, vs, vz, t0, valid, length, cfg)
        return m_new, l, acc

    init = (
        jnp.full((cfg.rows,), -jnp.inf, jnp.float32),
        jnp.zeros((cfg.rows,), jnp.float32),
        jnp.zeros((cfg.rows, cfg.head_dim), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, n_blocks, body, init)
    plgpu.store(acc_ref.at[pl.ds(0, cfg.rows), :], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[pl.ds(0, cfg.rows)], m, mask=row_ok)
    plgpu.store(l_ref.at[pl.ds(0, cfg.rows)], l, mask=row_ok)


# ----------------------------------------------------------------------------- wrapper


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


def merge_splits(acc, m, l):
    """Partials [B, H, S, G, (D)] of the splits -> normalised out [B, H, G, D], lse [B, H, G]."""
    m_max = jnp.max(m, axis=2)
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.exp(m - m_max[:, :, None])  # 0 for empty splits (m = -inf)
    total = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * acc, axis=2)
    ok = total > 0
    safe = jnp.where(ok, total, 1.0)
    return (
        jnp.where(ok[..., None], o / safe[..., None], 0.0),
        jnp.where(ok, m_max + jnp.log(safe), -jnp.inf),
    )


def _pallas_gpu(
    q,
    k: QuantizedTensor,
    v: QuantizedTensor,
    length,
    *,
    sm_scale,
    interpret,
    block=None,
    num_splits=None,
    target_programs=512,
    num_warps=4,
    num_stages=3,
    fast_convert=True,
    mma=None,
):
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    gq = hq // hkv
    align = max(
        _Operand.of(x).group_size if _Operand.of(x).granularity == "per_channel" else 1
        for x in (k, v)
    )
    block = block or max(64, align)
    if not _is_pow2(block) or block % align:
        raise UserError(f"block must be a power of two and a multiple of {align}, got {block}")
    split, n_splits = _choose_split(b, hkv, t, block, num_splits, target_programs)
    if mma is None:
        mma = "f32" if q.dtype == jnp.float32 else "bf16"
    cfg = _Config(
        group_q=gq,
        rows=max(16, pl.next_power_of_2(gq)),
        head_dim=d,
        block=block,
        split=split,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        mma=mma,
        fast_convert=fast_convert,
        k=_Operand.of(k),
        v=_Operand.of(v),
    )

    def arrays(x):  # int8 bits are read as uint8 and re-centred in the kernel
        if not isinstance(x, QuantizedTensor):
            return [x]
        codes = lax.bitcast_convert_type(x.codes, jnp.uint8) if x.signed else x.codes
        return [codes, x.scale] + ([x.zero] if x.zero is not None else [])

    operands = arrays(k) + arrays(v)
    length = jnp.clip(length.astype(jnp.int32), 0, t)
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
    )(length, q4, *operands)
    out, lse = merge_splits(acc, m, l)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def _default_implementation(q, k, v, interpret) -> str:
    if interpret:
        return "pallas_gpu"
    if jax.default_backend() == "gpu" and pallas_kernel_supports(q, k, v) is None:
        return "pallas_gpu"
    return "reference"


def quantized_decode_attention(
    q: jax.Array,
    k: QuantizedTensor | jax.Array,
    v: QuantizedTensor | jax.Array,
    length: jax.Array,
    *,
    sm_scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    **kernel_options,
) -> tuple[jax.Array, jax.Array]:
    """Decode attention of q [B, Hq, D] over one quantized cache segment.

    Same arguments and results as `quantized_decode_attention_reference` (out [B, Hq, D] float32,
    normalised over the segment; lse [B, Hq] float32, -inf where length == 0), plus:

    Args:
      implementation: "pallas_gpu" (Pallas Triton kernel), "pallas_tpu" (Mosaic TPU kernel,
        quantized_attention_tpu.py) or "reference" (plain JAX). None picks the GPU kernel on a
        GPU backend (when `pallas_kernel_supports` the shapes), else the reference: the TPU
        kernel was checked in TPU interpret mode only (no TPU was available), so it runs only
        when asked for.
      interpret: run the Pallas kernel in interpret mode (any backend, e.g. CPU tests).
      **kernel_options: tuning for the GPU kernel: block (slots per loop step), num_splits or
        target_programs (sequence splits), num_warps, num_stages, fast_convert, mma. The TPU
        kernel takes block (slots per grid step) only.
    """
    check_decode_inputs(q, k, v, length)
    impl = implementation or _default_implementation(q, k, v, interpret)
    if impl == "reference":
        return quantized_decode_attention_reference(q, k, v, length, sm_scale=sm_scale)
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "pallas_tpu":
        if (why := pallas_tpu_supports(q, k, v)) is not None:
            raise UserError(
                f"the TPU kernel cannot run this input ({why}); use implementation='reference'"
            )
        return pallas_tpu(q, k, v, length, sm_scale=sm_scale, interpret=interpret, **kernel_options)
    if (why := pallas_kernel_supports(q, k, v)) is not None:
        raise UserError(
            f"the Pallas kernel cannot run this input ({why}); use implementation='reference'"
        )
    return _pallas_gpu(q, k, v, length, sm_scale=sm_scale, interpret=interpret, **kernel_options)
