"""2**x on the GPU in one instruction, for the online softmax of the Pallas Triton kernels.

jnp.exp lowers to libdevice's expf: about ten instructions per element (range reduction, two
FFMAs for ln 2 in two parts, MUFU.EX2, a rescale) on every score of a decode step's tile; replacing
it took the int4 store's loop from 1,194 to 1,050 instructions per warp and 128-slot step
(compiled offline, docs/kernels.md, H200 run of 2026-12-04).
The kernels instead fold log2(e) into the query, keep scores and running maxima in log2 units
and use `ex2.approx.ftz.f32` (MUFU.EX2 alone; relative error about 2**-22, results below 2**-126
flushed to 0, which is what an online softmax drops anyway).
"""

import math

import jax
import jax.numpy as jnp
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
