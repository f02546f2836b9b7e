"""H2O's column-sum kernel against the prefill attention it follows, one layer, Llama-3.1-8B shape.

  python -m benchmarks.column_sums_bench [--context 32768] [--variants '{"block_k": 64}' ...]

Times, for one layer (32 query heads, 8 kv-heads, head_dim 128, bf16, batch 1): cuDNN's fused
causal attention with and without its log-sum-exp output, and `attention_column_sums` (the
Pallas kernel) under its defaults and each variant of its tuning options; checks each variant
against the plain-JAX reference. Time = median of repeated jitted calls (milliseconds: dispatch
is negligible at this size). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.column_sums import attention_column_sums
from pallas_kernels.column_sums_reference import attention_column_sums_reference

HQ, HKV, D = 32, 8, 128


def median_ms(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--variants", nargs="*", type=json.loads, default=[],
                    help="kernel options to time besides the defaults, as JSON objects")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("column_sums_bench: needs a GPU (the kernel is Pallas Triton)")
    t = args.context
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, HQ, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, HKV, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, HKV, D), jnp.bfloat16)
    lengths = jnp.full((1,), t, jnp.int32)

    def attention(with_lse):
        return jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
            implementation="cudnn", return_residual=with_lse))

    print(f"{jax.devices()[0].device_kind}, context {t}, one layer ({HQ} q-heads, {HKV} "
          f"kv-heads, head_dim {D}, bf16)")
    print(f"  cuDNN causal attention:            {median_ms(attention(False), q, k, v, lengths):7.2f} ms")
    print(f"  cuDNN causal attention + lse:      {median_ms(attention(True), q, k, v, lengths):7.2f} ms")
    _, lse = attention(True)(q, k, v, lengths)
    reference = jax.jit(attention_column_sums_reference)(q, k, lse, lengths)
    for options in [{}] + args.variants:
        kernel = jax.jit(lambda q, k, lse, n, o=options: attention_column_sums(
            q, k, lse, n, implementation="pallas_gpu", **o))
        sums = kernel(q, k, lse, lengths)
        err = float(jnp.linalg.norm(sums - reference) / jnp.linalg.norm(reference))
        label = json.dumps(options) if options else "defaults"
        print(f"  column sums {label:22s} {median_ms(kernel, q, k, lse, lengths):7.2f} ms "
              f"(rel. error against the reference {err:.1e})")


if __name__ == "__main__":
    main()
