"""Mosaic TPU Pallas decode attention over a bit-packed quantized KV segment.

Computes exactly what `quantized_attention_reference.quantized_decode_attention_reference`
documents, from the same `QuantizedTensor`s (kv_packing.py) or dense bf16/f32 arrays, without
writing a dequantized K or V to HBM:

- grid (batch, kv-head, token block): batch and head are "parallel", the block axis is last and
  "arbitrary" (sequential). Per step the pipeline DMAs one block of `block` slots of packed codes
  and the scales/zeros of those slots into VMEM. The lengths are scalar-prefetched into SMEM; the
  index maps clamp a block past the length to the last valid one (so nothing new is fetched for
  it) and `pl.when` skips its compute.
- the `Hq // Hkv` query heads of a kv-head are the rows of one matrix, so the packed K/V of a
  head are read once per kv-head, never once per query head.
- unpacking works on 2-D tiles with no reshapes: one exact bf16 matrix product with a 0/1 matrix
  copies byte `c // P` into lane `c` (`[block, D // P] @ [D // P, D]`; bytes <= 255 are exact in
  bf16), then a per-lane shift by `(c % P) * bits` and a mask give the codes. Per-token scales
  and zeros reach their lanes by selects, per-channel ones their rows by concatenating broadcast
  row groups (G rows each, G a multiple of 8). int8 codes are sign-extended as they are read.
- slots at or past the length are zeroed after dequantisation (garbage, even NaN scales, there is
  harmless) and their scores set to -inf; the online softmax (max, sum, accumulator, float32)
  lives in VMEM scratch across the blocks; the last block writes the normalised output and lse.

Checked on a CPU only, in TPU interpret mode (`pltpu.InterpretParams`) and through the
Pallas-to-Mosaic lowering (`jax.export` for platform "tpu"); the Mosaic compiler (layouts,
relayouts) and the speed are unverified: no TPU was available. So the dispatcher in
quantized_attention.py runs it only when asked (`implementation="pallas_tpu"`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.errors import UserError
from pallas_kernels.kv_packing import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the kernel needs to know, statically, about one K or V operand."""

    granularity: str  # "per_channel", "per_token" or "dense" (a bf16/f32 array)
    bits: int = 16
    per_byte: int = 1  # codes per byte (1 for int8 and 8-bit)
    group_size: int = 1
    has_zero: bool = False

    @property
    def n_arrays(self) -> int:
        return 1 if self.granularity == "dense" else 3 if self.has_zero else 2

    @classmethod
    def of(cls, x: QuantizedTensor | jax.Array) -> _Layout:
        if not isinstance(x, QuantizedTensor):
            return cls("dense")
        per_byte = 1 if x.signed else 8 // x.bits
        return cls(x.granularity, x.bits, per_byte, x.group_size, x.zero is not None)


@dataclasses.dataclass(frozen=True)
class _Config:
    head_dim: int
    block: int  # cache slots per grid step
    sm_scale: float
    precise: bool  # float32 q: float32 products at HIGHEST precision (else bf16 operands)
    k: _Layout
    v: _Layout


def pallas_tpu_supports(q, k, v) -> str | None:
    """None if the TPU kernel handles these shapes, else the reason it does not."""
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"q must be bfloat16 or float32, got {q.dtype}"
    for name, x in (("keys", k), ("values", v)):
        per_channel = isinstance(x, QuantizedTensor) and x.granularity == "per_channel"
        if per_channel and (x.group_size % 8 or x.group_size & (x.group_size - 1)):
            return f"{name}: per_channel group_size must be a power of two >= 8, got {x.group_size}"
    return None


# ----------------------------------------------------------------------------- kernel helpers


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _codes(words, op: _Layout, d: int):
    """Codes tile [block, D // P] (uint8 packed, or int8) -> float32 [block, D]."""
    ints = words.astype(jnp.int32)  # int8 sign-extends, uint8 zero-extends
    if op.per_byte > 1:
        w = words.shape[1]
        spread = (lax.div(_iota((w, d), 1), op.per_byte) == _iota((w, d), 0)).astype(jnp.bfloat16)
        byte_of_lane = lax.dot_general(
            ints.astype(jnp.float32).astype(jnp.bfloat16),
            spread,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        shift = lax.rem(_iota((1, d), 1), op.per_byte) * op.bits
        ints = lax.shift_right_logical(byte_of_lane.astype(jnp.int32), shift)
        ints = ints & ((1 << op.bits) - 1)
    return ints.astype(jnp.float32)


def _spread(x, op: _Layout, block: int, d: int):
    """Scale or zero tile of one block -> float32 [block, D]."""
    x = x.astype(jnp.float32)
    g = op.group_size
    if op.granularity == "per_channel":  # [block // G, D]: row r of the tile covers G slots
        rows = [jnp.broadcast_to(x[r : r + 1, :], (g, d)) for r in range(block // g)]
        return jnp.concatenate(rows, axis=0)
    out = jnp.broadcast_to(x[:, 0:1], (block, d))  # per_token: [block, D // G]
    group_of_lane = lax.div(_iota((block, d), 1), g)
    for i in range(1, d // g):
        out = jnp.where(group_of_lane == i, x[:, i : i + 1], out)
    return out


def _dequantize(refs, op: _Layout, valid, cfg: _Config):
    """One block of keys or values -> float32 [block, D]; rows past the length are 0."""
    if op.granularity == "dense":
        x = refs[0][...].astype(jnp.float32)
    else:
        x = _codes(refs[0][...], op, cfg.head_dim)
        x = x * _spread(refs[1][...], op, cfg.block, cfg.head_dim)
        if op.has_zero:
            x = x + _spread(refs[2][...], op, cfg.block, cfg.head_dim)
    return jnp.where(valid, x, 0.0)


def _dot(a, b, cfg: _Config, transpose_b=False):
    """a [M, K] @ b [K, N] (or b [N, K] transposed), float32 accumulation."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    if cfg.precise:
        a, b, precision = a.astype(jnp.float32), b.astype(jnp.float32), lax.Precision.HIGHEST
    else:
        a, b, precision = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(lengths_ref, q_ref, *refs, cfg: _Config):
    n_k, n_v = cfg.k.n_arrays, cfg.v.n_arrays
    k_refs, v_refs = refs[:n_k], refs[n_k : n_k + n_v]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[n_k + n_v :]
    j = pl.program_id(2)
    start = j * cfg.block
    length = lengths_ref[pl.program_id(0)]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < length)  # every block run holds >= 1 valid slot: m_new is finite
    def _step():
        valid = start + _iota((cfg.block, cfg.head_dim), 0) < length  # full tiles, no broadcast
        k = _dequantize(k_refs, cfg.k, valid, cfg)
        s = _dot(q_ref[...], k, cfg, transpose_b=True) * cfg.sm_scale  # [G, block]
        s = jnp.where(start + _iota(s.shape, 1) < length, s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = _dequantize(v_refs, cfg.v, valid, cfg)
        acc_ref[...] = acc_ref[...] * alpha + _dot(p, v, cfg)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finalize():
        l, m = l_ref[...], m_ref[...]
        ok = l > 0
        safe = jnp.where(ok, l, 1.0)
        o_ref[...] = jnp.where(ok, acc_ref[...] / safe, 0.0)
        lse_ref[...] = jnp.where(ok, m + jnp.log(safe), -jnp.inf)


# ----------------------------------------------------------------------------- wrapper


def _arrays(x: QuantizedTensor | jax.Array) -> list[jax.Array]:
    if not isinstance(x, QuantizedTensor):
        return [x]
    return [x.codes, x.scale] + ([x.zero] if x.zero is not None else [])


def _block_specs(x, op: _Layout, block: int) -> list[pl.BlockSpec]:
    """BlockSpecs of one operand's arrays: the slots of token block j (clamped to the length)."""

    def index(b, h, j, lengths):
        last = jnp.maximum(pl.cdiv(lengths[b], block) - 1, 0)
        return b, h, jnp.minimum(j, last), 0

    arrays = _arrays(x)
    specs = [pl.BlockSpec((pl.squeezed, pl.squeezed, block, arrays[0].shape[-1]), index)]
    for a in arrays[1:]:
        rows = block // op.group_size if op.granularity == "per_channel" else block
        specs.append(pl.BlockSpec((pl.squeezed, pl.squeezed, rows, a.shape[-1]), index))
    return specs


def pallas_tpu(q, k, v, length, *, sm_scale=None, interpret=False, block=None):
    """The TPU kernel: same contract as the reference (out [B, Hq, D], lse [B, Hq], float32).

    block: cache slots per grid step, a power of two >= 32 and a multiple of 8 * G for
    per-channel operands (default max(128, 8 * G)). interpret: TPU interpret mode (CPU tests).
    """
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    gq = hq // hkv
    ops = _Layout.of(k), _Layout.of(v)
    align = max([8 * op.group_size for op in ops if op.granularity == "per_channel"] + [32])
    block = block or max(128, align)
    if block & (block - 1) or block % align:
        raise UserError(f"block must be a power of two and a multiple of {align}, got {block}")
    cfg = _Config(
        head_dim=d,
        block=block,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        precise=q.dtype == jnp.float32,
        k=ops[0],
        v=ops[1],
    )
    head = lambda i, h, j, lengths: (i, h, 0, 0)
    per_head = lambda *tail: pl.BlockSpec((pl.squeezed, pl.squeezed, gq, *tail), head)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, pl.cdiv(t, block)),
        in_specs=[per_head(d), *_block_specs(k, ops[0], block), *_block_specs(v, ops[1], block)],
        out_specs=[per_head(d), per_head(1)],
        scratch_shapes=[
            pltpu.VMEM((gq, 1), jnp.float32),
            pltpu.VMEM((gq, 1), jnp.float32),
            pltpu.VMEM((gq, d), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, gq, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, gq, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="quantized_decode_attention_tpu",
    )(jnp.clip(length.astype(jnp.int32), 0, t), q.reshape(b, hkv, gq, d), *_arrays(k), *_arrays(v))
    return out.reshape(b, hq, d), lse.reshape(b, hq)
