"""Inline PTX for the Pallas Triton kernels; interpret mode has no PTX, so each helper uses jnp.

`exp2`, for the online softmax of every Triton kernel: jnp.exp lowers to libdevice's expf: about
ten instructions per element (range reduction, two FFMAs for ln 2 in two parts, MUFU.EX2, a
rescale) on every score of a decode step's tile (the instruction counts saved: docs/kernels.md,
section "H200 run (2026-12-04): exp2 softmax, pair shifts"). The kernels instead fold log2(e) into the query, keep scores and running
maxima in log2 units and use `ex2.approx.ftz.f32` (MUFU.EX2 alone; relative error about 2**-22,
results below 2**-126 flushed to 0, which is what an online softmax drops anyway).

`dequantize_planes`, `int8_keys`, `int8_value_planes`: the code conversions of the quantized
decode-attention kernel (quantized_attention_gpu.py), two 16-bit values per instruction chain.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def exp2(x: jax.Array, interpret: bool) -> jax.Array:
    """2**x, float32; interpret mode has no PTX, so it uses jnp.exp2."""
    if interpret:
        return jnp.exp2(x)
    return plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )[0]


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


def int8_keys(codes, interpret: bool):
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


def int8_value_planes(words, interpret: bool):
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


def dequantize_planes(codes, scales, zeros, bits: int, pairs: bool, interpret: bool):
    """Packed codes [R, C] and bf16 [R, C] scale/zero per plane -> P bf16 planes [R, C].

    Codes are unsigned `bits`-bit codes in uint8 bytes, or in uint16 byte pairs when `pairs`. Plane j of a byte holds the
    codes at bits [j * bits, (j + 1) * bits) (channel P * i + j of byte i); of a pair, plane
    per_byte * b + j takes plane j of byte b (channel P * i + per_byte * b + j of pair i).
    Each code is dequantized as code * scale + zero and rounded once to bfloat16. On a GPU this
    is inline PTX (`_plane_dequant_ptx`, `_pair_plane_dequant_ptx`); interpret mode has no PTX
    and uses jnp.
    """
    per_byte, mask = 8 // bits, (1 << bits) - 1
    shifts = [8 * b + bits * j for b in range(2 if pairs else 1) for j in range(per_byte)]
    if interpret:
        return [
            (((codes >> shift) & mask).astype(jnp.float32) * scale.astype(jnp.float32)
             + zero.astype(jnp.float32)).astype(jnp.bfloat16)
            for shift, scale, zero in zip(shifts, scales, zeros)
        ]
    planes = []
    for i, (scale, zero) in enumerate(zip(scales, zeros)):
        if pairs:
            asm = _pair_plane_dequant_ptx(bits, i // per_byte, i % per_byte)
            constraints, pack = "=r,r,r,r", 2
        else:
            asm, constraints, pack = _plane_dequant_ptx(bits, i), "=r,=r,r,r,r,r,r", 4
        planes += plgpu.elementwise_inline_asm(
            asm,
            args=[codes, scale, zero],
            constraints=constraints,
            pack=pack,
            result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)],
        )
    return planes
