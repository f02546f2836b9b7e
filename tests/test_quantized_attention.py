"""Quantized decode attention: the Pallas kernels against their plain-JAX reference.

On a CPU the GPU kernel runs in Pallas interpret mode; on a GPU backend the same tests run the
compiled Triton kernel. The TPU kernel runs in TPU interpret mode, on a CPU only. Inputs are
random (codes, scales, zeros, queries), never zeros.
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.errors import UserError
from pallas_kernels import kv_packing as kp
from pallas_kernels.quantized_attention import quantized_decode_attention
from pallas_kernels.quantized_attention_reference import (
    merge_attention_segments,
    quantized_decode_attention_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _kernel(q, k, v, length, **options):
    return quantized_decode_attention(
        q, k, v, length, implementation="pallas_gpu", interpret=not ON_GPU, **options
    )


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _random_cache(seed, b, hkv, t, d, bits, fmt, dtype, group=32):
    """Random codes, scales and zeros in the packed layout (not produced by a quantizer).

    fmt: "kivi" (per-channel keys, per-token values), "tok" (both per token: the int4 store),
    "chan" (both per channel), "int8" (MaxText) or "dense" (plain arrays, no quantization)."""
    r = np.random.default_rng(seed)
    f = lambda *shape, lo=0.02, hi=0.2: jnp.asarray(r.uniform(lo, hi, shape), dtype)
    n = lambda *shape: jnp.asarray(r.normal(size=shape), dtype)
    if fmt == "dense":
        return n(b, hkv, t, d), n(b, hkv, t, d)
    if fmt == "int8":
        c = lambda: jnp.asarray(r.integers(-127, 128, (b, hkv, t, d)), jnp.int8)
        return kp.QuantizedTensor.int8(c(), f(b, hkv, t)), kp.QuantizedTensor.int8(
            c(), f(b, hkv, t)
        )

    def tensor(granularity):
        shape = (b, hkv, t // group, d) if granularity == "per_channel" else (b, hkv, t, d // group)
        codes = jnp.asarray(r.integers(0, 256, (b, hkv, t, d * bits // 8)), jnp.uint8)
        return kp.QuantizedTensor(codes, f(*shape), n(*shape), bits, group, granularity)

    k_gran = "per_token" if fmt == "tok" else "per_channel"
    return tensor(k_gran), tensor("per_channel" if fmt == "chan" else "per_token")


def _assert_matches_reference(out, lse, q, k, v, length, dtype):
    """Shapes, dtypes and values of a kernel's (out, lse) against the reference's."""
    ref_out, ref_lse = quantized_decode_attention_reference(q, k, v, length)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel_err(out, ref_out) < TOL[dtype]
    # bf16 products round scores of a few units by ~1e-2, which lse near 0 shows as absolute error
    atol = max(1e-3, TOL[dtype])
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=TOL[dtype], atol=atol)


def _query(seed, b, hq, d, dtype):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, hq, d)) * 2.0, dtype)


# (format, bits, dtype, batch, kv_heads, gqa group, head_dim, slots, lengths)
CASES = [
    ("tok", 4, jnp.float32, 2, 2, 4, 128, 160, [150, 37]),
    ("tok", 4, jnp.bfloat16, 1, 2, 8, 64, 96, [90]),
    ("tok", 4, jnp.bfloat16, 2, 2, 4, 128, 160, [150, 37]),  # the int4 store, Llama head_dim
    ("tok", 2, jnp.float32, 1, 1, 4, 128, 64, [50]),
    ("chan", 4, jnp.float32, 1, 2, 4, 64, 128, [100]),
    ("kivi", 4, jnp.float32, 2, 2, 4, 64, 160, [150, 37]),
    ("kivi", 4, jnp.bfloat16, 3, 1, 8, 64, 192, [191, 64, 5]),
    ("kivi", 2, jnp.float32, 1, 2, 1, 64, 96, [77]),
    ("kivi", 2, jnp.bfloat16, 2, 2, 4, 128, 128, [128, 100]),
    ("kivi", 4, jnp.bfloat16, 1, 2, 4, 128, 128, [100]),
    ("kivi", 8, jnp.float32, 2, 1, 8, 32, 160, [33, 159]),
    ("kivi", 8, jnp.bfloat16, 1, 4, 1, 64, 64, [63]),
    ("int8", 8, jnp.float32, 2, 2, 8, 64, 150, [150, 99]),
    ("int8", 8, jnp.bfloat16, 3, 2, 1, 64, 77, [1, 76, 50]),
    ("int8", 8, jnp.bfloat16, 1, 2, 4, 128, 200, [170]),
]


@pytest.mark.parametrize("fmt,bits,dtype,b,hkv,group,d,t,lengths", CASES)
def test_kernel_matches_reference(fmt, bits, dtype, b, hkv, group, d, t, lengths):
    k, v = _random_cache(bits * 7 + b, b, hkv, t, d, bits, fmt, dtype)
    q = _query(b + group, b, hkv * group, d, dtype)
    length = jnp.asarray(lengths, jnp.int32)
    out, lse = _kernel(q, k, v, length, block=32, num_splits=2)
    _assert_matches_reference(out, lse, q, k, v, length, dtype)


@pytest.mark.parametrize("fmt,bits", [("tok", 4), ("int8", 8), ("kivi", 4)])
def test_wide_batch_defaults_match_reference(fmt, bits):
    # 64 (sequence, kv-head) pairs: the default tuning switches to 128-slot blocks (and 2 warps
    # for KIVI); the last block of each sequence is partial.
    b, hkv, t = 16, 4, 160
    k, v = _random_cache(bits * 7 + b, b, hkv, t, 128, bits, fmt, jnp.bfloat16)
    q = _query(9, b, hkv * 4, 128, jnp.bfloat16)
    length = jnp.asarray(np.random.default_rng(bits).integers(1, t + 1, b), jnp.int32)
    out, lse = _kernel(q, k, v, length)
    _assert_matches_reference(out, lse, q, k, v, length, jnp.bfloat16)


@pytest.mark.parametrize(
    "fmt,bits,group", [("kivi", 4, 64), ("kivi", 4, 128), ("tok", 4, 64), ("tok", 4, 128),
                       ("kivi", 2, 64), ("kivi", 8, 128)]
)
def test_group_sizes_match_reference(fmt, bits, group):
    # per-token groups of 64/128 channels, per-channel groups of 64/128 slots (the block grows)
    k, v = _random_cache(group + bits, 2, 2, 256, 128, bits, fmt, jnp.float32, group)
    q = _query(5, 2, 8, 128, jnp.float32)
    length = jnp.asarray([256, 129], jnp.int32)
    out, lse = _kernel(q, k, v, length, num_splits=3)
    ref_out, ref_lse = quantized_decode_attention_reference(q, k, v, length)
    assert _rel_err(out, ref_out) < 1e-5 and _rel_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize(
    "options",
    [dict(fast_convert=False), dict(mma="tf32"), dict(block=128, num_splits=1), dict(dequant="f32")],
)
def test_kernel_variants_match_reference(options):
    k, v = _random_cache(3, 2, 2, 128, 64, 4, "kivi", jnp.bfloat16)
    q = _query(4, 2, 8, 64, jnp.bfloat16)
    length = jnp.asarray([120, 61], jnp.int32)
    out, _ = _kernel(q, k, v, length, **{"block": 64, **options})
    ref_out, _ = quantized_decode_attention_reference(q, k, v, length)
    assert _rel_err(out, ref_out) < 1e-2


@pytest.mark.parametrize("pairs", [True, False])
def test_byte_and_pair_reads_match_reference(pairs):
    # The int4 store at head_dim 128 in bf16: codes read as uint16 byte pairs or as bytes.
    k, v = _random_cache(11, 1, 2, 128, 128, 4, "tok", jnp.bfloat16)
    q = _query(12, 1, 8, 128, jnp.bfloat16)
    length = jnp.asarray([97], jnp.int32)
    out, lse = _kernel(q, k, v, length, pairs=pairs)
    _assert_matches_reference(out, lse, q, k, v, length, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_segment_matches_reference(dtype):
    r = np.random.default_rng(21)
    k, v = (jnp.asarray(r.normal(size=(2, 2, 100, 64)), dtype) for _ in range(2))
    q = _query(22, 2, 8, 64, dtype)
    length = jnp.asarray([100, 45], jnp.int32)
    out, lse = _kernel(q, k, v, length, block=32)
    ref_out, ref_lse = quantized_decode_attention_reference(q, k, v, length)
    assert _rel_err(out, ref_out) < TOL[dtype] and _rel_err(lse, ref_lse) < TOL[dtype]


def test_empty_segment_gives_zero_output_and_minus_inf_lse():
    k, v = _random_cache(5, 2, 1, 64, 32, 4, "kivi", jnp.float32)
    q = _query(6, 2, 4, 32, jnp.float32)
    length = jnp.asarray([0, 40], jnp.int32)
    for out, lse in (
        _kernel(q, k, v, length, block=32),
        quantized_decode_attention_reference(q, k, v, length),
    ):
        assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
        assert np.all(np.isfinite(np.asarray(lse[1])))


def test_lengths_outside_the_cache_are_clipped():
    """A length past T reads the whole cache (never past it), a negative one nothing: the kernel
    clips in-kernel exactly as the reference does."""
    k, v = _random_cache(8, 2, 2, 96, 64, 8, "int8", jnp.bfloat16)
    q = _query(9, 2, 8, 64, jnp.bfloat16)
    length = jnp.asarray([96 + 50, -3], jnp.int32)
    out, lse = _kernel(q, k, v, length, block=32, num_splits=2)
    _assert_matches_reference(out, lse, q, k, v, length, jnp.bfloat16)
    full, _ = _kernel(q, k, v, jnp.asarray([96, 0], jnp.int32), block=32, num_splits=2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full))
    assert np.all(np.isneginf(np.asarray(lse[1])))


def test_garbage_past_length_is_ignored():
    k, v = _random_cache(7, 1, 2, 128, 64, 4, "kivi", jnp.float32)
    q = _query(8, 1, 4, 64, jnp.float32)
    length = jnp.asarray([70], jnp.int32)  # groups 0-2 of 32 hold valid slots, group 3 does not
    nan = jnp.float32(jnp.nan)
    k_bad = kp.QuantizedTensor(
        k.codes.at[:, :, 70:].set(255),
        k.scale.at[:, :, 3:].set(nan),
        k.zero.at[:, :, 3:].set(nan),
        4,
        32,
        "per_channel",
    )
    v_bad = kp.QuantizedTensor(
        v.codes.at[:, :, 70:].set(255),
        v.scale.at[:, :, 70:].set(nan),
        v.zero.at[:, :, 70:].set(1e30),
        4,
        32,
        "per_token",
    )
    out, lse = _kernel(q, k_bad, v_bad, length, block=32)
    ref_out, ref_lse = _kernel(q, k, v, length, block=32)
    assert _rel_err(out, ref_out) < 1e-6 and _rel_err(lse, ref_lse) < 1e-6


def test_merging_two_segments_equals_attending_to_both():
    k, v = _random_cache(9, 2, 2, 128, 64, 4, "kivi", jnp.float32)
    q = _query(10, 2, 8, 64, jnp.float32)
    full = jnp.asarray([128, 128], jnp.int32)
    # Segment 1: slots 0..63; segment 2: slots 64..127 (its own arrays, as a cache part would be).
    head = lambda qt, sl, gsl: kp.QuantizedTensor(
        qt.codes[:, :, sl], qt.scale[:, :, gsl], qt.zero[:, :, gsl], 4, 32, qt.granularity
    )
    k1, k2 = head(k, slice(0, 64), slice(0, 2)), head(k, slice(64, 128), slice(2, 4))
    v1, v2 = head(v, slice(0, 64), slice(0, 64)), head(v, slice(64, 128), slice(64, 128))
    half = jnp.asarray([64, 64], jnp.int32)
    o1, l1 = _kernel(q, k1, v1, half, block=32)
    o2, l2 = _kernel(q, k2, v2, half, block=32)
    out, lse = merge_attention_segments([o1, o2], [l1, l2])
    ref_out, ref_lse = quantized_decode_attention_reference(q, k, v, full)
    assert _rel_err(out, ref_out) < 1e-5 and _rel_err(lse, ref_lse) < 1e-5


def test_reference_matches_float64_softmax_per_query_head():
    b, hkv, group, t, d = 2, 2, 4, 64, 32
    k, v = _random_cache(11, b, hkv, t, d, 4, "kivi", jnp.float32)
    q = _query(12, b, hkv * group, d, jnp.float32)
    length = np.array([64, 23])
    out, lse = quantized_decode_attention_reference(q, k, v, jnp.asarray(length))
    kf = np.asarray(kp.dequantize(k), np.float64)
    vf = np.asarray(kp.dequantize(v), np.float64)
    qn = np.asarray(q, np.float64)
    for bi in range(b):
        for h in range(hkv * group):
            n = length[bi]
            s = kf[bi, h // group, :n] @ qn[bi, h] / np.sqrt(d)
            np.testing.assert_allclose(lse[bi, h], np.log(np.sum(np.exp(s))), rtol=1e-5)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(
                out[bi, h], p @ vf[bi, h // group, :n] / p.sum(), rtol=1e-4, atol=1e-5
            )


def _numpy_pack(codes, bits):
    """The documented layout, bit by bit: channel c lives in byte c // P at bits
    [(c % P) * bits, (c % P + 1) * bits), P = 8 // bits."""
    per = 8 // bits
    packed = np.zeros(codes.shape[:-1] + (codes.shape[-1] // per,), np.uint8)
    for c in range(codes.shape[-1]):
        packed[..., c // per] |= (codes[..., c].astype(np.uint8) << ((c % per) * bits)).astype(
            np.uint8
        )
    return packed


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_codes_is_the_documented_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (2, 3, 64)).astype(np.uint8)
    packed = kp.pack_codes(jnp.asarray(codes), bits)
    assert packed.shape == (2, 3, 64 * bits // 8)
    np.testing.assert_array_equal(packed, _numpy_pack(codes, bits))
    np.testing.assert_array_equal(kp.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("quantize", ["per_channel", "per_token", "int8"])
def test_quantizers_are_within_half_a_step(quantize):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 64, 64)), jnp.float32)
    if quantize == "int8":
        qt = kp.quantize_int8_symmetric(x, jnp.float32)
        step = np.repeat(np.asarray(qt.scale), 64, axis=3)
    else:
        fn = kp.quantize_per_channel if quantize == "per_channel" else kp.quantize_per_token
        qt = fn(x, 4, 32, jnp.float32)
        step = np.repeat(np.asarray(qt.scale), 32, axis=2 if quantize == "per_channel" else 3)
    err = np.abs(np.asarray(kp.dequantize(qt)) - np.asarray(x))
    assert np.all(err <= step / 2 + 1e-5)


def test_dispatcher_uses_the_reference_off_gpu():
    k, v = _random_cache(13, 1, 1, 32, 32, 4, "kivi", jnp.float32)
    q = _query(14, 1, 1, 32, jnp.float32)
    length = jnp.asarray([20], jnp.int32)
    out, _ = quantized_decode_attention(q, k, v, length)
    ref_out, _ = quantized_decode_attention_reference(q, k, v, length)
    if not ON_GPU:
        np.testing.assert_array_equal(out, ref_out)
    assert _rel_err(out, ref_out) < 1e-5


def test_bad_inputs_raise_user_error():
    k, v = _random_cache(15, 1, 2, 64, 32, 4, "kivi", jnp.float32)
    length = jnp.asarray([10], jnp.int32)
    with pytest.raises(UserError, match="multiple of kv heads"):
        quantized_decode_attention(_query(0, 1, 3, 32, jnp.float32), k, v, length)
    with pytest.raises(UserError, match="implementation"):
        quantized_decode_attention(
            _query(0, 1, 2, 32, jnp.float32), k, v, length, implementation="cuda"
        )
    with pytest.raises(UserError, match="dequant"):  # the PTX path makes bf16 operands only
        _kernel(_query(0, 1, 2, 32, jnp.float32), k, v, length, dequant="ptx")
    with pytest.raises(UserError, match="T % group_size"):
        kp.quantize_per_channel(jnp.ones((1, 1, 40, 32)), 4)


# ----------------------------------------------------------------------------- the TPU kernel

needs_cpu = pytest.mark.skipif(ON_GPU, reason="the TPU kernel is checked in interpret mode on CPU")


def _tpu_kernel(q, k, v, length, **options):
    return quantized_decode_attention(
        q, k, v, length, implementation="pallas_tpu", interpret=True, **options
    )


def _poison_past_length(x, length):
    """x with garbage in every slot at or past `length`: NaN values or scales, all-ones codes,
    huge zeros (per-channel scales and zeros only in groups that hold no valid slot)."""
    past = lambda n, step=1: (jnp.arange(n) * step >= length[:, None])[:, None, :, None]
    if not isinstance(x, kp.QuantizedTensor):
        return jnp.where(past(x.shape[2]), jnp.nan, x)
    slots = past(x.shape[2])
    codes = jnp.where(slots, jnp.asarray(-1).astype(x.codes.dtype), x.codes)
    if x.granularity == "per_channel":
        groups = past(x.scale.shape[2], x.group_size)
        scale, zero = jnp.where(groups, jnp.nan, x.scale), x.zero
        zero = None if zero is None else jnp.where(groups, jnp.nan, zero)
    else:
        scale, zero = jnp.where(slots, jnp.nan, x.scale), x.zero
        zero = None if zero is None else jnp.where(slots, 1e30, zero)
    return dataclasses.replace(x, codes=codes, scale=scale, zero=zero)


# (format, bits, dtype, batch, kv_heads, gqa group, head_dim, slots, lengths, block); the default
# block is 128 slots, 256 with per-channel groups of 32.
TPU_CASES = [
    ("kivi", 4, jnp.float32, 2, 2, 4, 64, 320, [300, 37], None),
    ("kivi", 4, jnp.bfloat16, 2, 1, 8, 128, 192, [192, 0], None),
    ("kivi", 2, jnp.float32, 1, 2, 1, 128, 256, [129], None),
    ("kivi", 2, jnp.bfloat16, 1, 1, 4, 64, 512, [511], None),
    ("kivi", 8, jnp.float32, 1, 2, 4, 64, 256, [200], None),
    ("tok", 4, jnp.float32, 1, 2, 8, 128, 300, [299], None),
    ("tok", 4, jnp.bfloat16, 2, 2, 4, 64, 200, [200, 64], 64),
    ("chan", 4, jnp.float32, 1, 1, 4, 64, 256, [100], None),
    ("int8", 8, jnp.float32, 2, 2, 8, 64, 150, [150, 99], None),
    ("int8", 8, jnp.bfloat16, 2, 1, 1, 128, 77, [0, 76], 32),
    ("dense", 0, jnp.float32, 1, 2, 4, 64, 140, [133], None),
    ("dense", 0, jnp.bfloat16, 2, 1, 8, 128, 260, [5, 260], None),
]


@needs_cpu
@pytest.mark.parametrize("fmt,bits,dtype,b,hkv,group,d,t,lengths,block", TPU_CASES)
def test_tpu_kernel_matches_reference_with_garbage_past_length(
    fmt, bits, dtype, b, hkv, group, d, t, lengths, block
):
    length = jnp.asarray(lengths, jnp.int32)
    k, v = (
        _poison_past_length(x, length)
        for x in _random_cache(bits + b, b, hkv, t, d, bits, fmt, dtype)
    )
    q = _query(b + group, b, hkv * group, d, dtype)
    out, lse = _tpu_kernel(q, k, v, length, block=block)
    _assert_matches_reference(out, lse, q, k, v, length, dtype)


def test_tpu_kernel_lowers_to_mosaic():
    # The Pallas-to-Mosaic lowering runs without a TPU; the Mosaic compiler itself does not.
    length = jnp.asarray([300, 5], jnp.int32)
    formats = [
        ("kivi", 4, jnp.bfloat16),
        ("kivi", 2, jnp.float32),
        ("tok", 4, jnp.bfloat16),
        ("int8", 8, jnp.bfloat16),
        ("dense", 0, jnp.bfloat16),
    ]
    for fmt, bits, dtype in formats:
        k, v = _random_cache(1, 2, 2, 512, 128, bits, fmt, dtype)
        q = _query(2, 2, 8, 128, dtype)
        kernel = lambda q, k, v, length: quantized_decode_attention(
            q, k, v, length, implementation="pallas_tpu"
        )
        lowered = export.export(jax.jit(kernel), platforms=["tpu"])(q, k, v, length)
        assert "tpu_custom_call" in lowered.mlir_module(), fmt


def test_tpu_kernel_rejects_what_it_cannot_run():
    q, length = _query(16, 1, 2, 64, jnp.float32), jnp.asarray([10], jnp.int32)
    k, v = _random_cache(17, 1, 1, 64, 64, 4, "kivi", jnp.float32, group=4)
    with pytest.raises(UserError, match="per_channel group_size"):
        _tpu_kernel(q, k, v, length)
    k, v = _random_cache(17, 1, 1, 64, 64, 4, "kivi", jnp.float32)
    with pytest.raises(UserError, match="multiple of 256"):
        _tpu_kernel(q, k, v, length, block=128)
