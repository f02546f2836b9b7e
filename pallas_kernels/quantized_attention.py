"""Decode attention over one quantized KV segment: picks the kernel that runs it.

Computes exactly what `quantized_attention_reference.quantized_decode_attention_reference`
documents (the reference is the documentation), with one of four implementations:

- "pallas_gpu": the Pallas Triton flash-decoding kernel (quantized_attention_gpu.py), which
  never writes a dequantized K or V to device memory; JAX 0.11 deprecates the Triton backend in
  favour of Mosaic GPU but still runs it.
- "mosaic_gpu": for MaxText int8 on Hopper, a Pallas Mosaic GPU kernel whose scores are an
  int8 x int8 product (quantized_attention_mosaic.py), faster GPU side than the Triton kernel
  at every batch measured (docs/kernels.md, section "H200 run (2026-12-05)").
- "pallas_tpu": the Mosaic TPU variant (quantized_attention_tpu.py). It was checked on a CPU
  only (TPU interpret mode, Pallas-to-Mosaic lowering), so with `implementation=None` the
  dispatcher does not pick it: on TPU it uses the reference.
- "reference": plain JAX (quantized_attention_reference.py).

Performance: int8 comes closest to the read-bandwidth floor; the 4-bit kernels are bound by
instruction issue (dequantisation, Triton's operand layouts). Figures: docs/kernels.md, the
summary at the end of section "H200 run (2026-12-05)".
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import cannot_run, choose_implementation
from pallas_kernels.kv_packing import QuantizedTensor
from pallas_kernels.quantized_attention_gpu import pallas_gpu, pallas_kernel_supports
from pallas_kernels.quantized_attention_mosaic import (
    mosaic_int8_attention,
    mosaic_int8_supports,
    on_hopper,
)
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

IMPLEMENTATIONS = ("reference", "pallas_gpu", "mosaic_gpu", "pallas_tpu")
_KERNELS = {"pallas_gpu": pallas_gpu, "mosaic_gpu": mosaic_int8_attention, "pallas_tpu": pallas_tpu}


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
        jnp float32 arithmetic), pairs (True: per-token 4-bit codes are read as uint16 byte
        pairs where the head is wide enough, see `quantized_attention_gpu_tiles.reads_pairs`).
        The TPU kernel takes block (slots per grid step) only; the Mosaic GPU kernel block,
        target_programs and stages.
    """
    check_decode_inputs(q, k, v, length)
    impl = choose_implementation(
        implementation or None,  # "" picks one too
        IMPLEMENTATIONS,
        auto=lambda: _default_implementation(q, k, v, interpret),
        refusals={
            "mosaic_gpu": lambda: cannot_run(
                "Mosaic GPU", mosaic_int8_supports(q, k, v), suggest_reference=False
            ),
            "pallas_tpu": lambda: cannot_run("TPU", pallas_tpu_supports(q, k, v)),
            "pallas_gpu": lambda: cannot_run("Pallas", pallas_kernel_supports(q, k, v)),
        },
    )
    if impl == "reference":
        return quantized_decode_attention_reference(q, k, v, length, sm_scale=sm_scale)
    kernel = _KERNELS[impl]
    return kernel(q, k, v, length, sm_scale=sm_scale, interpret=interpret, **kernel_options)
