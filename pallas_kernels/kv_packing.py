"""Bit-packed quantized KV tensors: the storage format, quantizers and dequantizer.

One layer's quantized keys or values are one `QuantizedTensor`; the attention kernel and its
reference read exactly this format, and the compression methods (KIVI, int8) write it.

Layout (B batch, H kv-heads, T cache slots, D head_dim, P = 8 // bits codes per byte):

- ``codes``: uint8 [B, H, T, D // P] for asymmetric codes of 2, 4 or 8 bits. Channel ``c`` lives
  in byte ``c // P`` at bits ``[(c % P) * bits, (c % P + 1) * bits)``: little end first.
  Or int8 [B, H, T, D] for symmetric int8 (MaxText style; ``zero`` is None).
- ``granularity="per_channel"`` (KIVI keys): each channel has its own scale and zero, shared by
  a group of ``group_size`` consecutive tokens: ``scale``/``zero`` [B, H, T // G, D].
- ``granularity="per_token"`` (KIVI values, int8): each token has its own scale and zero, shared
  by a group of ``group_size`` consecutive channels: ``scale``/``zero`` [B, H, T, D // G].
  MaxText int8 is per_token with ``group_size == D`` and no zero: ``scale`` [B, H, T, 1].
- dequantized value = code * scale + zero (zero omitted when None); scale and zero are float32
  or bfloat16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.errors import UserError

GRANULARITIES = ("per_channel", "per_token")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One layer's quantized keys or values (see the module docstring for the layout)."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    granularity: str = dataclasses.field(metadata=dict(static=True))

    @property
    def signed(self) -> bool:
        """True for symmetric int8 codes (MaxText style), False for unsigned packed codes."""
        return self.codes.dtype == jnp.int8

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * (1 if self.signed else 8 // self.bits)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[B, H, T, D] of the dequantized tensor."""
        b, h, t, _ = self.codes.shape
        return (b, h, t, self.head_dim)

    @classmethod
    def int8(cls, codes: jax.Array, scale: jax.Array) -> QuantizedTensor:
        """MaxText-style int8: codes int8 [B, H, T, D], absmax scale [B, H, T]; value = code * scale."""
        qt = cls(
            codes=codes,
            scale=scale[..., None],
            zero=None,
            bits=8,
            group_size=codes.shape[-1],
            granularity="per_token",
        )
        qt.validate()
        return qt

    def validate(self) -> None:
        """Raises UserError if the arrays do not match the documented layout."""
        if self.bits not in (2, 4, 8):
            raise UserError(f"bits must be 2, 4 or 8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.codes.ndim != 4:
            raise UserError(
                f"codes must be [B, H, T, D // (8 // bits)], got shape {self.codes.shape}"
            )
        if self.signed:
            if self.bits != 8 or self.zero is not None:
                raise UserError("int8 (signed) codes need bits=8 and zero=None (symmetric)")
        elif self.codes.dtype != jnp.uint8:
            raise UserError(
                f"codes must be uint8 (packed) or int8 (symmetric), got {self.codes.dtype}"
            )
        b, h, t, d = self.shape
        g = self.group_size
        if self.granularity == "per_channel":
            if t % g:
                raise UserError(f"per_channel groups of {g} tokens need T % {g} == 0, got T={t}")
            want = (b, h, t // g, d)
        else:
            if d % g or g % (8 // self.bits if not self.signed else 1):
                raise UserError(
                    f"per_token groups of {g} channels must divide D={d} and be a whole"
                    " number of bytes"
                )
            want = (b, h, t, d // g)
        if self.scale.shape != want:
            raise UserError(
                f"{self.granularity} scale must have shape {want}, got {self.scale.shape}"
            )
        if self.zero is not None and self.zero.shape != want:
            raise UserError(
                f"{self.granularity} zero must have shape {want}, got {self.zero.shape}"
            )
        if self.scale.dtype not in (jnp.float32, jnp.bfloat16):
            raise UserError(f"scale must be float32 or bfloat16, got {self.scale.dtype}")


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., D] with values < 2**bits -> packed uint8 [..., D * bits // 8]."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise UserError(
            f"last dim {codes.shape[-1]} must be a multiple of {per_byte} for {bits}-bit"
        )
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    # The bit fields do not overlap, so a sum is a bitwise or.
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
    """Packed uint8 [..., D * bits // 8] -> uint8 codes [..., D] (inverse of `pack_codes`)."""
    per_byte = 8 // bits
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    c = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _divide(x, d):
    """x / d with one IEEE division per element, as KIVI's torch code divides. XLA otherwise turns
    a division by a broadcast (or a constant) into a multiplication by its reciprocal, which rounds
    differently; the barrier hides the broadcast from that rewrite."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape))


def _minmax_quantize(x, bits, axis, scale_dtype):
    """Asymmetric min-max quantization of x over `axis` (kept as size 1), KIVI's quantizer:
    scale = (max - min) / (2^b - 1), code = round(clamp((x - min) / scale, 0, 2^b - 1)) with
    round half to even; a zero range (scale 0) gives code 0. Codes are computed against the
    stored (scale_dtype) scale and zero."""
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    scale = _divide(hi - lo, 2**bits - 1).astype(scale_dtype)
    zero = lo.astype(scale_dtype)
    s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.round(jnp.clip(_divide(x - z32, safe), 0, 2**bits - 1)).astype(jnp.uint8)
    return codes, scale, zero


def quantize_per_channel(
    x: jax.Array, bits: int, group_size: int = 32, scale_dtype=jnp.bfloat16
) -> QuantizedTensor:
    """KIVI keys: x [B, H, T, D] -> per-channel codes with one scale/zero per `group_size` tokens."""
    b, h, t, d = x.shape
    if t % group_size:
        raise UserError(
            f"per_channel quantization needs T % group_size == 0, got T={t},"
            f" group_size={group_size}"
        )
    xg = x.astype(jnp.float32).reshape(b, h, t // group_size, group_size, d)
    codes, scale, zero = _minmax_quantize(xg, bits, axis=3, scale_dtype=scale_dtype)
    qt = QuantizedTensor(
        codes=pack_codes(codes.reshape(b, h, t, d), bits),
        scale=scale[:, :, :, 0],
        zero=zero[:, :, :, 0],
        bits=bits,
        group_size=group_size,
        granularity="per_channel",
    )
    qt.validate()
    return qt


def quantize_per_token(
    x: jax.Array, bits: int, group_size: int = 32, scale_dtype=jnp.bfloat16
) -> QuantizedTensor:
    """KIVI values: x [B, H, T, D] -> per-token codes with one scale/zero per `group_size` channels."""
    b, h, t, d = x.shape
    if d % group_size:
        raise UserError(
            f"per_token quantization needs D % group_size == 0, got D={d}, group_size={group_size}"
        )
    xg = x.astype(jnp.float32).reshape(b, h, t, d // group_size, group_size)
    codes, scale, zero = _minmax_quantize(xg, bits, axis=4, scale_dtype=scale_dtype)
    qt = QuantizedTensor(
        codes=pack_codes(codes.reshape(b, h, t, d), bits),
        scale=scale[..., 0],
        zero=zero[..., 0],
        bits=bits,
        group_size=group_size,
        granularity="per_token",
    )
    qt.validate()
    return qt


def quantize_int8_symmetric(x: jax.Array, scale_dtype=jnp.bfloat16) -> QuantizedTensor:
    """MaxText int8: x [B, H, T, D] -> int8 codes and one absmax scale per token and head."""
    x32 = x.astype(jnp.float32)
    scale = _divide(jnp.max(jnp.abs(x32), axis=-1), 127.0).astype(scale_dtype)
    s32 = scale.astype(jnp.float32)[..., None]
    codes = jnp.clip(jnp.round(_divide(x32, jnp.where(s32 > 0, s32, 1.0))), -127, 127)
    codes = codes.astype(jnp.int8)
    return QuantizedTensor.int8(codes, scale)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """QuantizedTensor -> dense [B, H, T, D] in `dtype` (materialises it: for references/tests)."""
    b, h, t, d = qt.shape
    g = qt.group_size
    if qt.signed:
        codes = qt.codes.astype(jnp.float32)
    else:
        codes = unpack_codes(qt.codes, qt.bits).astype(jnp.float32)
    if qt.granularity == "per_channel":
        expand = lambda a: jnp.repeat(a.astype(jnp.float32), g, axis=2)  # [B,H,T//G,D] -> [B,H,T,D]
    else:
        expand = lambda a: jnp.repeat(a.astype(jnp.float32), g, axis=3)  # [B,H,T,D//G] -> [B,H,T,D]
    x = codes * expand(qt.scale)
    if qt.zero is not None:
        x = x + expand(qt.zero)
    return x.astype(dtype)
