"""Operands and tiles of the quantized decode-attention GPU kernel (quantized_attention_gpu.py).

What the kernel knows statically about a K or V operand (`Operand`) and about the whole call
(`Config`), which conversion path an operand takes (`bf16x2_path`, `int8_ptx_path`,
`reads_pairs`), and how one block of cache slots is loaded from its refs: codes, scales and
zeros as masked tiles (slots >= length read as 0), dequantised in registers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.ptx import dequantize_planes

_MAGIC = 0x4B000000  # float32 bits of 2**23: (_MAGIC | c) reinterpreted is 2**23 + c, exactly.


@dataclasses.dataclass(frozen=True)
class Operand:
    """What the kernel needs to know, statically, about a QuantizedTensor."""

    bits: int
    signed: bool
    granularity: str
    group_size: int
    has_zero: bool
    head_dim: int
    raw: bool = False  # a dense bf16/f32 array (an exact segment), no codes or scales
    pairs: bool = False  # codes read as uint16 byte pairs (set by the wrapper: `reads_pairs`)
    words: bool = False  # int8 codes read as uint32 words, one plane per byte (int8 values)

    @property
    def per_byte(self) -> int:
        return 1 if self.signed else 8 // self.bits

    @property
    def planes(self) -> int:
        """Column planes of the bf16x2 path (codes per byte, or per byte pair) or of words."""
        return 4 if self.words else self.per_byte * (2 if self.pairs else 1)

    @property
    def folded(self) -> bool:
        """One scale per token for the whole head: fold it into scores / probabilities."""
        return self.granularity == "per_token" and self.group_size == self.head_dim

    @classmethod
    def of(cls, qt: QuantizedTensor | jax.Array, dequant: str, pairs: bool) -> Operand:
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
        op = cls(
            qt.bits, qt.signed, qt.granularity, qt.group_size, qt.zero is not None, qt.head_dim
        )
        return dataclasses.replace(op, pairs=pairs and reads_pairs(op, dequant))


@dataclasses.dataclass(frozen=True)
class Config:
    group_q: int  # query heads per kv-head
    rows: int  # group_q padded to the tensor cores' minimum of 16 rows
    head_dim: int
    block: int  # cache slots per loop step
    split: int  # cache slots per program (a multiple of block)
    sm_scale: float
    mma: str  # operand type of the matrix products: "bf16", "tf32" or "f32"
    fast_convert: bool
    dequant: str  # "ptx": codes to 16-bit pairs by inline PTX; "f32": jnp float32 arithmetic
    interpret: bool
    k: Operand
    v: Operand


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def load_rows(ref, start, n, valid):
    """ref[start:start+n] as an [n, C] tile; rows where `valid` is False read as 0."""
    return plgpu.load(ref.at[pl.ds(start, n), :], mask=valid[:, None], other=0)


def interleave(planes):
    """[x0, x1, ..., x_{P-1}] each [R, C] -> [R, C * P] with x_j[:, i] at column i * P + j."""

    def nest(ps):
        if len(ps) == 1:
            return ps[0]
        return jnp.stack([nest(ps[0::2]), nest(ps[1::2])], axis=-1)

    if len(planes) == 1:
        return planes[0]
    x = nest(planes)
    return x.reshape(x.shape[0], -1)


def codes_to_f32(words, op: Operand, fast: bool):
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
        f = lax.bitcast_convert_type(interleave(planes), jnp.float32)
        return f - (float(2**23) + offset)
    planes = [words if p == 1 else (words >> (j * op.bits)) & jnp.uint8(mask) for j in range(p)]
    f = interleave(planes).astype(jnp.float32)
    return f - offset if offset else f


def column_planes(ref, rows, ok, p: int, interpret: bool):
    """ref[rows] split by column: P tiles, tile j = columns j, j + P, ... (rows where `ok` [n, 1]
    is False read as 0)."""
    width = ref.shape[-1] // p
    if interpret:  # interpret mode has no strided loads
        whole = plgpu.load(ref.at[rows, :], mask=ok, other=0)
        return [whole.reshape(whole.shape[0], width, p)[:, :, j] for j in range(p)]
    return [plgpu.load(ref.at[rows, pl.ds(j, width, stride=p)], mask=ok, other=0) for j in range(p)]


def _plane_params(ref, op: Operand, t0, block, length, interpret):
    """Scale or zero per plane in code space: P bf16 tiles [block, D // P]."""
    g, p, d = op.group_size, op.planes, op.head_dim
    width = d // p
    if op.granularity == "per_channel":  # ref [T // g, D]; plane j = columns j, j + P, ...
        ng = block // g
        ok = ((t0 // g + jnp.arange(ng)) * g < length)[:, None]
        columns = column_planes(ref, pl.ds(t0 // g, ng), ok, p, interpret)
        return [
            jnp.broadcast_to(x.astype(jnp.bfloat16)[:, None, :], (ng, g, width)).reshape(block, width)
            for x in columns
        ]
    valid = t0 + jnp.arange(block) < length  # per_token: ref [T, D // g]; g // P codes per group
    x = load_rows(ref, t0, block, valid).astype(jnp.bfloat16)
    x = jnp.broadcast_to(x[:, :, None], (block, d // g, g // p)).reshape(block, width)
    return [x] * p


def dequantized_planes(ref_codes, ref_scale, ref_zero, op: Operand, t0, valid, length, cfg):
    """The block's K or V as P bf16 planes [block, D // P] (plane j: channels j, j + P, ...)."""
    codes = load_rows(ref_codes, t0, cfg.block, valid)
    scales = _plane_params(ref_scale, op, t0, cfg.block, length, cfg.interpret)
    if op.has_zero:
        zeros = _plane_params(ref_zero, op, t0, cfg.block, length, cfg.interpret)
    else:
        zeros = [jnp.zeros_like(x) for x in scales]
    return dequantize_planes(codes, scales, zeros, op.bits, op.pairs, cfg.interpret)


def bf16x2_path(op: Operand, dequant: str) -> bool:
    """Whether this operand is dequantized by `dequantize_planes` and multiplied plane by plane:
    2-/4-bit unsigned codes, not folded, with `dequant="ptx"`.

    The planes are never interleaved back into channel order (Triton's join of the packed bf16
    results put pairs of values in the wrong columns): the query is split into the same planes
    for the scores, and the output keeps one accumulator per value plane.
    """
    usable = not (op.raw or op.signed or op.folded) and op.bits < 8  # 128 + c exact for c < 128
    return dequant == "ptx" and usable


def int8_ptx_path(op: Operand, dequant: str) -> bool:
    """Whether this operand's int8 codes (MaxText: one folded scale per token) are converted by
    inline PTX: keys to float16 (`int8_keys`: 11 significant bits hold 1024 + u), so q . k
    runs on float16 tensor cores with q scaled per row into [-1, 1]; values to bfloat16 byte
    planes (`int8_value_planes`), so that p * scale keeps float32's exponent range. Both hold
    the codes exactly.
    """
    return dequant == "ptx" and op.signed and op.folded


def reads_pairs(op: Operand, dequant: str) -> bool:
    """Whether the bf16x2 path reads this per-token operand's codes as uint16 byte pairs.

    Triton builds the broadcast per-token scale and zero tiles in the MMA operand's register
    layout with one shared-memory load per element, and loads codes a byte at a time; pairs
    halve both. Each of the 16 // bits column planes must be at least 32 channels wide
    (narrower tiles make Triton repeat the dequantisation on every warp) and hold whole pairs
    per scale group. Per-channel operands (KIVI keys) keep bytes: as pairs their scales become
    twice as many strided loads. Timings: docs/kernels.md, section "H100 run (2026-11-23,
    per-token codes read as byte pairs)".
    """
    planes = 16 // op.bits
    return (
        bf16x2_path(op, dequant)
        and op.granularity == "per_token"
        and op.head_dim // planes >= 32
        and op.group_size % planes == 0
    )


def expanded(ref, op: Operand, t0, block, length):
    """Scale or zero of the tile's slots, broadcast to float32 [block, D]."""
    g, d = op.group_size, op.head_dim
    if op.granularity == "per_channel":  # ref [T // g, D]: one row per group of g slots
        ng = block // g
        first = t0 // g + jnp.arange(ng)
        x = load_rows(ref, t0 // g, ng, first * g < length).astype(jnp.float32)
        return jnp.broadcast_to(x[:, None, :], (ng, g, d)).reshape(block, d)
    valid = t0 + jnp.arange(block) < length  # per_token: ref [T, D // g]
    x = load_rows(ref, t0, block, valid).astype(jnp.float32)
    return jnp.broadcast_to(x[:, :, None], (block, d // g, g)).reshape(block, d)


def per_slot(ref, t0, block, valid):
    """Folded per-token scale or zero: ref [T] (the wrapper drops the unit axis) -> float32
    [1, block].

    Loaded as a vector and broadcast with [None, :], which Triton lays out as a slice of the
    score tile; a [block, 1] tile reshaped to [1, block] made it move the whole score tile
    through shared memory twice per block instead (int8: 2,598 instructions per 128-slot step
    of a warp, compiled offline; docs/kernels.md).
    """
    x = plgpu.load(ref.at[pl.ds(t0, block)], mask=valid, other=0)
    return x.astype(jnp.float32)[None, :]


def mma_cast(x, cfg: Config):
    return x.astype(jnp.bfloat16) if cfg.mma == "bf16" else x.astype(jnp.float32)


def dot(a, b, cfg: Config, transpose_b=False):
    """a [M, K] @ b [K, N] (or b [N, K] transposed) with float32 accumulation."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if cfg.mma == "f32" else None  # else TF32 / bf16 MMA
    return lax.dot_general(
        mma_cast(a, cfg),
        mma_cast(b, cfg),
        dims,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
