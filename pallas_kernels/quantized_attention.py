"""Pallas decode attention over a bit-packed quantized KV segment (flash-decoding).

Computes exactly what `quantized_attention_reference.quantized_decode_attention_reference`
documents, without ever writing a dequantized K or V to device memory:

- grid (batch, kv-head, split): each program owns one kv-head and one slice of `split` cache
  slots; the `Hq // Hkv` query heads of that kv-head ride along as the rows of one matrix, so
  the packed K/V of a head are read once per step, never once per query head.
- inside a program a loop walks `block` slots at a time: masked loads of the packed codes and
  their scales (slots >= length read as 0), dequantisation in registers, two small matrix
  products on the tensor cores and an online softmax (running max, sum and accumulator);
- 2- and 4-bit codes with bf16 products (`dequant="ptx"`, the default for bf16 q) are
  dequantised by inline PTX straight into bf16 pairs (`_plane_dequant_ptx`) and kept as bit
  planes (plane j = channels j, j + P, ...): q is split into the same planes for the scores
  and the output keeps one accumulator per value plane, so nothing is ever re-interleaved;
  per-token codes of wide heads are read as uint16 byte pairs (`_pair_plane_dequant_ptx`,
  P = 2 * codes per byte planes), which halves the loads of codes, scales and zeros;
  8-bit and f32 products use jnp float32 arithmetic (`dequant="f32"`);
- per-token scales that cover the whole head (MaxText int8) are folded instead of dequantised:
  the key scale multiplies the scores after q . code, the value scale multiplies the
  probabilities before p @ code; with bf16 q the int8 codes are converted exactly by inline
  PTX, keys into float16 (q . k on float16 tensor cores, q scaled per row into [-1, 1]) and
  values, read as uint32 words, into four bfloat16 byte planes (`_int8_ptx_path`);
- each split writes its partial (acc, max, sum); a second small kernel (split_merge.py) merges
  the splits by log-sum-exp into the normalised output and its lse.

Dense bf16/f32 K/V arrays (an exact segment such as the recent window) take the same path with
no dequantisation.

GPU lowering: Pallas Triton (`plgpu.CompilerParams`). JAX 0.11 deprecates that backend in favour
of Mosaic GPU but still runs it. MaxText int8 on Hopper goes instead to a Pallas Mosaic
GPU kernel whose scores are an int8 x int8 product (quantized_attention_mosaic.py,
`implementation="mosaic_gpu"`): on an H200 it beat the Triton kernel GPU side at batch 1, 2, 4,
8 and 16 (docs/kernels.md, "H200 run (2026-12-05)").
TPU: the Mosaic TPU variant lives in quantized_attention_tpu.py (`implementation="pallas_tpu"`).
It was checked on a CPU only (TPU interpret mode, Pallas-to-Mosaic lowering), so with
`implementation=None` the dispatcher does not pick it: on TPU it uses the reference.

Performance (docs/kernels.md, H200, 2026-12-04/05, wall clock against the benchmark's floor): int8
at batch 1 reaches 64-76% with the Mosaic GPU kernel (Triton's: 52-63%), at batch 16 98%
(Triton's: 87-93%);
the int4 store 43-45% at batch 1 and 72-79% at batch 16, KIVI int4 less: the 4-bit kernels are
bound by instruction issue (dequantisation, Triton's operand layouts).
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
from pallas_kernels.fast_exp2 import LN2, LOG2E, exp2
from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.quantized_attention_reference import (
    check_decode_inputs,
    merge_attention_segments,
    quantized_decode_attention_reference,
)
from pallas_kernels.quantized_attention_mosaic import (
    mosaic_int8_attention,
    mosaic_int8_supports,
    on_hopper,
)
from pallas_kernels.quantized_attention_tpu import pallas_tpu, pallas_tpu_supports
from pallas_kernels.split_merge import merge_splits

__all__ = [
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
    "merge_attention_segments",
    "pallas_kernel_supports",
    "IMPLEMENTATIONS",
]

IMPLEMENTATIONS = ("reference", "pallas_gpu", "mosaic_gpu", "pallas_tpu")

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
    pairs: bool = False  # codes read as uint16 byte pairs (set by the wrapper: `_reads_pairs`)
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
    def of(cls, qt: QuantizedTensor | jax.Array, dequant: str, pairs: bool) -> _Operand:
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
        return dataclasses.replace(op, pairs=pairs and _reads_pairs(op, dequant))


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
    dequant: str  # "ptx": codes to 16-bit pairs by inline PTX; "f32": jnp float32 arithmetic
    interpret: bool
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


_BF16X2_128 = 0x43004300  # two bfloat16 128.0: (0x4300 | c) is 128 + c exactly for c < 128
_BF16X2_ONE = 0x3F803F80
_BF16X2_MINUS_128 = 0xC300C300


def _dequant_ptx(bits: int, lanes) -> str:
    """Inline PTX dequantising one plane of packed codes into bf16x2 registers.

    For each (source, selector, shift, result, scale, zero) in `lanes`: the plane's codes of
    the two bf16 lanes are brought to the low bits of each 16-bit half of t (by prmt with
    `selector`, which spreads two bytes of `source`, unless it is None, and a right shift by
    `shift`), masked into the mantissa of 128.0 (lop3), 128 is subtracted exactly and one
    fma.rn.bf16x2 applies scale and zero with a single rounding into `result`: 4 to 5
    instructions per 2 values instead of the float32 path's extend, shift, mask, subtract,
    multiply-add and convert per value.
    """
    mask = ((1 << bits) - 1) * 0x00010001
    lines = [
        "{",
        ".reg .b32 t, x, magic, one, neg;",
        f"mov.b32 magic, {_BF16X2_128:#x};",
        f"mov.b32 one, {_BF16X2_ONE:#x};",
        f"mov.b32 neg, {_BF16X2_MINUS_128:#x};",
    ]
    for source, selector, shift, result, scale, zero in lanes:
        if selector is None:
            lines.append(f"shr.b32 t, {source}, {shift};" if shift else f"mov.b32 t, {source};")
        else:
            lines.append(f"prmt.b32 t, {source}, 0, {selector:#x};")
            if shift:
                lines.append(f"shr.b32 t, t, {shift};")
        lines += [
            f"lop3.b32 x, t, {mask:#x}, magic, 0xEA;",  # (t & mask) | magic
            "fma.rn.bf16x2 x, x, one, neg;",
            f"fma.rn.bf16x2 {result}, x, {scale}, {zero};",
        ]
    lines.append("}")
    return "\n".join(lines)


def _plane_dequant_ptx(bits: int, plane: int) -> str:
    """`_dequant_ptx` on 4 packed bytes (Triton pack=4): $0, $1 the result (2 bf16 each), $2
    the bytes, $3-$4 their scales, $5-$6 their zeros; prmt result bytes [2h, 0, 2h + 1, 0]."""
    shift = bits * plane
    return _dequant_ptx(
        bits,
        [("$2", 0x4140, shift, "$0", "$3", "$5"), ("$2", 0x4342, shift, "$1", "$4", "$6")],
    )


def _pair_plane_dequant_ptx(bits: int, byte: int, plane: int) -> str:
    """`_dequant_ptx` on 2 uint16 byte pairs (Triton pack=2): $0 the result (2 bf16), $1 the
    pairs, $2 their scales, $3 their zeros. Each pair already fills one bf16 lane, so a shift
    alone brings plane `plane` of byte `byte` to the low bits of both (no prmt): 3 shifts and
    4 lop3 for a register's 4 planes of 2 codes, where spreading bytes first took 10 (offline)."""
    return _dequant_ptx(bits, [("$1", None, 8 * byte + bits * plane, "$0", "$2", "$3")])


_F16X2_1152 = 0x64806480  # two float16 1152.0: (0x6400 | u) is 1024 + u exactly for u < 1024
_F32_BIAS = 0x4B000080  # float32 2**23 + 128: (0x4B000000 | u) is 2**23 + u exactly

# Keys: 4 int8 codes ($2, Triton pack=4) -> 2 registers of float16 pairs. The bytes are offset to
# u = c + 128 (xor), one prmt puts two of them under the exponent of 1024.0 (0x64XX is 1024 + u)
# and one sub.f16x2 removes 1152: 1.25 instructions per code, exact.
_INT8_TO_F16_PTX = f"""{{
.reg .b32 t, bias;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
mov.b32 bias, {_F16X2_1152:#x};
sub.rn.f16x2 $0, $0, bias;
sub.rn.f16x2 $1, $1, bias;
}}"""


def _byte_plane_ptx(byte: int) -> str:
    """Values: byte `byte` of 2 words of offset codes u = c + 128 ($1, $2; Triton pack=2) ->
    one register of 2 bfloat16 ($0). bfloat16's 8 significant bits cannot hold 1024 + u, so each
    byte goes into the mantissa of 2**23 (prmt), 2**23 + 128 is subtracted in float32 and
    cvt.rn.bf16x2.f32 packs the two exact results."""
    selector = 0x7540 | byte  # result bytes [u, 0, 0, 0x4B] from b = 0x4B000000
    return f"""{{
.reg .b32 a, b;
prmt.b32 a, $1, 0x4B000000, {selector:#x};
prmt.b32 b, $2, 0x4B000000, {selector:#x};
sub.rn.f32 a, a, 0f{_F32_BIAS:08X};
sub.rn.f32 b, b, 0f{_F32_BIAS:08X};
cvt.rn.bf16x2.f32 $0, b, a;
}}"""


def _int8_keys(codes, interpret: bool):
    """int8 key codes read as uint8 [R, D] -> the same integers in float16 [R, D] (exact)."""
    if interpret:  # interpret mode has no PTX
        return lax.bitcast_convert_type(codes, jnp.int8).astype(jnp.float16)
    return plgpu.elementwise_inline_asm(
        _INT8_TO_F16_PTX,
        args=[codes],
        constraints="=r,=r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.float16)],
    )[0]


def _int8_value_planes(words, interpret: bool):
    """int8 value codes read as uint32 words [R, D // 4] -> 4 exact bfloat16 planes [R, D // 4]
    (plane j: byte j of each word, channels j, j + 4, ...).

    Planes of whole words keep Triton from reading the codes a byte at a time: as a [R, D]
    tile converted straight into the MMA operand (pairs of slots per thread) it loaded them
    with one LDS.U8 and three quarters of a prmt each (compiled offline, docs/kernels.md).
    """
    u = words ^ jnp.uint32(0x80808080)
    if interpret:
        return [(((u >> (8 * j)) & 0xFF).astype(jnp.float32) - 128).astype(jnp.bfloat16)
                for j in range(4)]
    return [
        plgpu.elementwise_inline_asm(
            _byte_plane_ptx(j),
            args=[u],
            constraints="=r,r,r",
            pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.bfloat16)],
        )[0]
        for j in range(4)
    ]


def _dequantize_planes(codes, scales, zeros, op: _Operand, interpret: bool):
    """Packed codes [R, C] and bf16 [R, C] scale/zero per plane -> P bf16 planes [R, C].

    Codes are uint8 bytes, or uint16 byte pairs when `op.pairs`. Plane j of a byte holds the
    codes at bits [j * bits, (j + 1) * bits) (channel P * i + j of byte i); of a pair, plane
    per_byte * b + j takes plane j of byte b (channel P * i + per_byte * b + j of pair i).
    Each code is dequantized as code * scale + zero and rounded once to bfloat16. On a GPU this
    is inline PTX (`_plane_dequant_ptx`, `_pair_plane_dequant_ptx`); interpret mode has no PTX
    and uses jnp.
    """
    mask = (1 << op.bits) - 1
    shifts = [8 * b + op.bits * j for b in range(2 if op.pairs else 1) for j in range(op.per_byte)]
    if interpret:
        return [
            (((codes >> shift) & mask).astype(jnp.float32) * scale.astype(jnp.float32)
             + zero.astype(jnp.float32)).astype(jnp.bfloat16)
            for shift, scale, zero in zip(shifts, scales, zeros)
        ]
    planes = []
    for i, (scale, zero) in enumerate(zip(scales, zeros)):
        if op.pairs:
            asm = _pair_plane_dequant_ptx(op.bits, i // op.per_byte, i % op.per_byte)
            constraints, pack = "=r,r,r,r", 2
        else:
            asm, constraints, pack = _plane_dequant_ptx(op.bits, i), "=r,=r,r,r,r,r,r", 4
        planes += plgpu.elementwise_inline_asm(
            asm,
            args=[codes, scale, zero],
            constraints=constraints,
            pack=pack,
            result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)],
        )
    return planes


def _column_planes(ref, rows, ok, p: int, interpret: bool):
    """ref[rows] split by column: P tiles, tile j = columns j, j + P, ... (rows where `ok` [n, 1]
    is False read as 0)."""
    width = ref.shape[-1] // p
    if interpret:  # interpret mode has no strided loads
        whole = plgpu.load(ref.at[rows, :], mask=ok, other=0)
        return [whole.reshape(whole.shape[0], width, p)[:, :, j] for j in range(p)]
    return [plgpu.load(ref.at[rows, pl.ds(j, width, stride=p)], mask=ok, other=0) for j in range(p)]


def _plane_params(ref, op: _Operand, t0, block, length, interpret):
    """Scale or zero per plane in code space: P bf16 tiles [block, D // P]."""
    g, p, d = op.group_size, op.planes, op.head_dim
    width = d // p
    if op.granularity == "per_channel":  # ref [T // g, D]; plane j = columns j, j + P, ...
        ng = block // g
        ok = ((t0 // g + jnp.arange(ng)) * g < length)[:, None]
        columns = _column_planes(ref, pl.ds(t0 // g, ng), ok, p, interpret)
        return [
            jnp.broadcast_to(x.astype(jnp.bfloat16)[:, None, :], (ng, g, width)).reshape(block, width)
            for x in columns
        ]
    valid = t0 + jnp.arange(block) < length  # per_token: ref [T, D // g]; g // P codes per group
    x = _load_rows(ref, t0, block, valid).astype(jnp.bfloat16)
    x = jnp.broadcast_to(x[:, :, None], (block, d // g, g // p)).reshape(block, width)
    return [x] * p


def _dequantized_planes(ref_codes, ref_scale, ref_zero, op: _Operand, t0, valid, length, cfg):
    """The block's K or V as P bf16 planes [block, D // P] (plane j: channels j, j + P, ...)."""
    codes = _load_rows(ref_codes, t0, cfg.block, valid)
    scales = _plane_params(ref_scale, op, t0, cfg.block, length, cfg.interpret)
    if op.has_zero:
        zeros = _plane_params(ref_zero, op, t0, cfg.block, length, cfg.interpret)
    else:
        zeros = [jnp.zeros_like(x) for x in scales]
    return _dequantize_planes(codes, scales, zeros, op, cfg.interpret)


def _bf16x2_path(op: _Operand, dequant: str) -> bool:
    """Whether this operand is dequantized by `_dequantize_planes` and multiplied plane by plane:
    2-/4-bit unsigned codes, not folded, with `dequant="ptx"`.

    The planes are never interleaved back into channel order (Triton's join of the packed bf16
    results put pairs of values in the wrong columns): the query is split into the same planes
    for the scores, and the output keeps one accumulator per value plane.
    """
    usable = not (op.raw or op.signed or op.folded) and op.bits < 8  # 128 + c exact for c < 128
    return dequant == "ptx" and usable


def _int8_ptx_path(op: _Operand, dequant: str) -> bool:
    """Whether this operand's int8 codes (MaxText: one folded scale per token) are converted by
    inline PTX: keys to float16 (`_int8_keys`: 11 significant bits hold 1024 + u), so q . k
    runs on float16 tensor cores with q scaled per row into [-1, 1]; values to bfloat16 byte
    planes (`_int8_value_planes`), so that p * scale keeps float32's exponent range. Both hold
    the codes exactly.
    """
    return dequant == "ptx" and op.signed and op.folded


def _reads_pairs(op: _Operand, dequant: str) -> bool:
    """Whether the bf16x2 path reads this per-token operand's codes as uint16 byte pairs.

    Triton builds the broadcast per-token scale and zero tiles in the MMA operand's register
    layout with one shared-memory load per element, and loads codes a byte at a time; pairs
    halve both (H100, batch 16, 32k slots: the int4 store 401 -> 306-309 us, KIVI int4 491 ->
    423 us; docs/kernels.md). Each of the 16 // bits column planes must be at least 32 channels
    wide (narrower tiles make Triton repeat the dequantisation on every warp) and hold whole
    pairs per scale group. Per-channel operands (KIVI keys) keep bytes: as pairs their scales
    become twice as many strided loads (KIVI int4 604 us).
    """
    planes = 16 // op.bits
    return (
        _bf16x2_path(op, dequant)
        and op.granularity == "per_token"
        and op.head_dim // planes >= 32
        and op.group_size % planes == 0
    )


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
    """Folded per-token scale or zero: ref [T] (the wrapper drops the unit axis) -> float32
    [1, block].

    Loaded as a vector and broadcast with [None, :], which Triton lays out as a slice of the
    score tile; a [block, 1] tile reshaped to [1, block] made it move the whole score tile
    through shared memory twice per block instead (int8: 2,598 instructions per 128-slot step
    of a warp, compiled offline; docs/kernels.md).
    """
    x = plgpu.load(ref.at[pl.ds(t0, block)], mask=valid, other=0)
    return x.astype(jnp.float32)[None, :]


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
    if _bf16x2_path(op, cfg.dequant):  # q: one [rows, D // P] tile per plane
        planes = _dequantized_planes(kc, ks, kz, op, t0, valid, length, cfg)
        return sum(_dot(qj, kj, cfg, transpose_b=True) for qj, kj in zip(q, planes))
    if _int8_ptx_path(op, cfg.dequant):  # q = (q / |q|_inf as float16, |q|_inf per row)
        q16, norm = q
        codes = _int8_keys(_load_rows(kc, t0, cfg.block, valid), cfg.interpret)
        s = lax.dot_general(q16, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return s * (norm[:, None] * _per_slot(ks, t0, cfg.block, valid))
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
    if _bf16x2_path(op, cfg.dequant):  # one [rows, D // P] result per plane
        planes = _dequantized_planes(vc, vs, vz, op, t0, valid, length, cfg)
        return tuple(_dot(p, vj, cfg) for vj in planes)
    if op.words:  # exact bf16 codes, one byte plane per accumulator; p * s keeps bf16's range
        planes = _int8_value_planes(_load_rows(vc, t0, cfg.block, valid), cfg.interpret)
        w = p * _per_slot(vs, t0, cfg.block, valid)
        return tuple(_dot(w, x, cfg) for x in planes)
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

    length = jnp.clip(length_ref[()], 0, kc.shape[0])  # T; here, not as one more XLA op per call
    start = pl.program_id(2) * cfg.split
    n_slots = jnp.clip(length - start, 0, cfg.split)
    n_blocks = (n_slots + cfg.block - 1) // cfg.block
    row_ok = jnp.arange(cfg.rows) < cfg.group_q
    q_rows, q_ok = pl.ds(0, cfg.rows), row_ok[:, None]
    if _bf16x2_path(cfg.k, cfg.dequant):
        q = _column_planes(q_ref, q_rows, q_ok, cfg.k.planes, cfg.interpret)
    else:
        q = plgpu.load(q_ref.at[q_rows, :], mask=q_ok, other=0)
    scale = cfg.sm_scale * LOG2E  # scores, maxima and sums in log2 units (fast_exp2.py)
    if _int8_ptx_path(cfg.k, cfg.dequant):  # float16 products: rows scaled into [-1, 1]
        q = q.astype(jnp.float32) * scale
        norm = jnp.max(jnp.abs(q), axis=1)
        norm = jnp.where(norm > 0, norm, 1.0)
        q = ((q / norm[:, None]).astype(jnp.float16), norm)
    else:
        q = jax.tree.map(lambda x: _mma_cast(x.astype(jnp.float32) * scale, cfg), q)
    v_planes = cfg.v.planes if _bf16x2_path(cfg.v, cfg.dequant) or cfg.v.words else 1

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
        plgpu.store(acc_ref.at[q_rows, :], _interleave(list(acc)), mask=q_ok)
    else:
        width = cfg.head_dim // v_planes
        for j, a in enumerate(acc):
            plgpu.store(acc_ref.at[q_rows, pl.ds(j, width, stride=v_planes)], a, mask=q_ok)
    plgpu.store(m_ref.at[q_rows], m * LN2, mask=row_ok)  # natural-log units for the merge
    plgpu.store(l_ref.at[q_rows], l, mask=row_ok)


# ----------------------------------------------------------------------------- wrapper


def _default_tuning(batch_heads: int, k: _Operand, v: _Operand, mma: str) -> dict:
    """Block, programs and warps where the caller gives none: the fastest measured on an H200.

    GPU-side (Nsight Compute) times of attention kernel + split merge, 32k slots, Llama-3.1-8B
    shape, 2026-12-03 (docs/kernels.md): with 16 sequences (128 (sequence, kv-head) pairs)
    blocks of 128 slots and 1,024 programs beat 64 and 512 (int4 store 294 -> 261 us, int8
    404 -> 386 us); with one sequence they lose (int8 37 -> 43 us: 128 splits make the merge
    5 -> 8 us), so narrow batches keep 64 and 512. Per-channel KIVI keys run best on 2 warps
    (batch 1: 49 -> 36 us; batch 16 with blocks of 128: 365 us against 401 us with 4 warps).
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
    k_op, v_op = (_Operand.of(x, dequant, pairs) for x in (k, v))
    v_op = dataclasses.replace(v_op, words=_int8_ptx_path(v_op, dequant))
    align = max(op.group_size if op.granularity == "per_channel" else 1 for op in (k_op, v_op))
    tuned = _default_tuning(b * hkv, k_op, v_op, mma)
    block = block or max(tuned["block"], align)
    target_programs = target_programs or tuned["target_programs"]
    num_warps = num_warps or tuned["num_warps"]
    if not _is_pow2(block) or block % align:
        raise UserError(f"block must be a power of two and a multiple of {align}, got {block}")
    split, n_splits = _choose_split(b, hkv, t, block, num_splits, target_programs)
    cfg = _Config(
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

    def arrays(x, op: _Operand):  # int8 bits are read as uint8 and re-centred in the kernel
        if op.raw:
            return [x]
        codes = lax.bitcast_convert_type(x.codes, jnp.uint8) if x.signed else x.codes
        if op.pairs or op.words:  # little-endian: byte b of a pair or word is bits [8b, 8b + 8)
            width = jnp.uint32 if op.words else jnp.uint16
            codes = lax.bitcast_convert_type(
                codes.reshape(*codes.shape[:-1], -1, jnp.dtype(width).itemsize), width
            )
        params = [x.scale] + ([x.zero] if x.zero is not None else [])
        if op.folded:  # [..., T, 1] -> [..., T]: read as vectors by `_per_slot`
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


def _default_implementation(q, k, v, interpret) -> str:
    if interpret:
        return "pallas_gpu"
    if jax.default_backend() != "gpu":
        return "reference"
    if on_hopper() and mosaic_int8_supports(q, k, v) is None:
        return "mosaic_gpu"
    if pallas_kernel_supports(q, k, v) is None:
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
      implementation: "pallas_gpu" (Pallas Triton kernel), "mosaic_gpu" (Pallas Mosaic GPU
        kernel for MaxText int8 on Hopper, quantized_attention_mosaic.py), "pallas_tpu" (Mosaic
        TPU kernel, quantized_attention_tpu.py) or "reference" (plain JAX). None picks, on a GPU
        backend, the Mosaic GPU kernel for int8 on Hopper (`mosaic_int8_supports`), else the
        Triton kernel when `pallas_kernel_supports` the shapes, else the reference; on other
        backends the reference: the TPU kernel was checked in TPU interpret mode only (no TPU
        was available), so it runs only when asked for.
      interpret: run the Pallas kernel in interpret mode (any backend, e.g. CPU tests).
      **kernel_options: tuning for the GPU kernel: block (slots per loop step), num_splits or
        target_programs (sequence splits), num_warps, num_stages, fast_convert, mma, dequant
        ("ptx": inline-PTX conversion of the codes, the default with bf16 products; "f32":
        jnp float32 arithmetic), pairs (True: per-token 4-bit codes are
        read as uint16 byte pairs where the head is wide enough, see `_reads_pairs`). The TPU
        kernel takes block (slots per grid step) only; the Mosaic GPU kernel block,
        target_programs and stages.
    """
    check_decode_inputs(q, k, v, length)
    impl = implementation or _default_implementation(q, k, v, interpret)
    if impl == "reference":
        return quantized_decode_attention_reference(q, k, v, length, sm_scale=sm_scale)
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "mosaic_gpu":
        if (why := mosaic_int8_supports(q, k, v)) is not None:
            raise UserError(f"the Mosaic GPU kernel cannot run this input ({why})")
        return mosaic_int8_attention(
            q, k, v, length, sm_scale=sm_scale, interpret=interpret, **kernel_options
        )
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
