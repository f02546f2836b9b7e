"""The Mosaic GPU int8 decode-attention kernel against the plain-JAX reference.

On a Hopper GPU the compiled kernel runs; elsewhere Mosaic GPU's CPU interpreter runs it, which
exists from JAX 0.11 on (Python >= 3.12): under older JAX (CI's Python 3.11 gets 0.10.2) only the
input checks run. Inputs are random codes and scales, never zeros.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.errors import UserError
from pallas_kernels import kv_packing as kp
from pallas_kernels.quantized_attention import quantized_decode_attention
from pallas_kernels.quantized_attention_mosaic import JAX_HAS_MOSAIC_INTERPRETER, on_hopper
from tests.test_quantized_attention import _assert_matches_reference

ON_HOPPER = on_hopper()
needs_kernel = pytest.mark.skipif(
    not (ON_HOPPER or JAX_HAS_MOSAIC_INTERPRETER and jax.default_backend() == "cpu"),
    reason="needs a Hopper GPU or Mosaic GPU's interpreter (JAX >= 0.11)",
)


def _kernel(q, k, v, length, **options):
    return quantized_decode_attention(
        q, k, v, length, implementation="mosaic_gpu", interpret=not ON_HOPPER, **options
    )


def _case(seed, b, hkv, group, t, scale_dtype=jnp.bfloat16):
    r = np.random.default_rng(seed)
    codes = lambda: jnp.asarray(r.integers(-127, 128, (b, hkv, t, 128)), jnp.int8)
    scales = lambda: jnp.asarray(r.uniform(0.002, 0.02, (b, hkv, t)), scale_dtype)
    k = kp.QuantizedTensor.int8(codes(), scales())
    v = kp.QuantizedTensor.int8(codes(), scales())
    q = jnp.asarray(r.normal(size=(b, hkv * group, 128)) * 2.0, jnp.bfloat16)
    return q, k, v


# (batch, kv-heads, query heads per kv-head, slots, lengths, kernel options)
CASES = [
    (1, 2, 4, 1000, [1000], dict(block=64, target_programs=8)),  # T not a multiple of the block
    (3, 1, 8, 320, [300, 77, 1], dict(block=64, target_programs=6, stages=2)),
    (2, 2, 1, 256, [256, 130], dict(block=128, target_programs=4, stages=2)),
]


@needs_kernel
@pytest.mark.parametrize("b,hkv,group,t,lengths,options", CASES)
def test_kernel_matches_reference(b, hkv, group, t, lengths, options):
    q, k, v = _case(b * 10 + group, b, hkv, group, t)
    length = jnp.asarray(lengths, jnp.int32)
    out, lse = _kernel(q, k, v, length, **options)
    _assert_matches_reference(out, lse, q, k, v, length, jnp.bfloat16)


@needs_kernel
def test_lengths_outside_the_cache_are_clipped_and_empty_is_minus_inf():
    q, k, v = _case(5, 3, 1, 4, 192, scale_dtype=jnp.float32)
    length = jnp.asarray([192 + 50, -3, 0], jnp.int32)
    out, lse = _kernel(q, k, v, length, target_programs=6)
    full, _ = _kernel(q, k, v, jnp.asarray([192, 0, 0], jnp.int32), target_programs=6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full))
    assert np.all(np.isneginf(np.asarray(lse[1:]))) and not np.any(np.asarray(out[1:]))
    _assert_matches_reference(out[:1], lse[:1], q[:1], *(jax.tree.map(lambda x: x[:1], (k, v))),
                              length[:1], jnp.bfloat16)


@needs_kernel
def test_garbage_past_length_is_ignored():
    q, k, v = _case(6, 1, 2, 4, 256)
    length = jnp.asarray([100], jnp.int32)
    poison = lambda x: kp.QuantizedTensor.int8(
        x.codes.at[:, :, 100:].set(127), x.scale[..., 0].at[:, :, 100:].set(jnp.nan)
    )
    out, lse = _kernel(q, poison(k), poison(v), length, target_programs=4)
    _assert_matches_reference(out, lse, q, k, v, length, jnp.bfloat16)


def test_unsupported_inputs_raise_user_error():
    q, k, v = _case(7, 1, 1, 4, 64)
    length = jnp.asarray([64], jnp.int32)
    with pytest.raises(UserError, match="Mosaic GPU kernel"):
        _kernel(q.astype(jnp.float32), k, v, length)
    with pytest.raises(UserError, match="Mosaic GPU kernel"):
        _kernel(jnp.tile(q, (1, 3, 1)), k, v, length)  # 12 query heads per kv-head
    with pytest.raises(UserError, match="Mosaic GPU kernel"):
        _kernel(q, k.codes.astype(jnp.bfloat16), v, length)
