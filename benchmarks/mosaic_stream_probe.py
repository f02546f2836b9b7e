"""How fast can a Pallas Mosaic GPU kernel stream one decode step's cache bytes? (GPU only)

  python benchmarks/mosaic_stream_probe.py [--shapes int8_b1 int4_b1 int8_b16]

The quantized-attention kernel (Pallas Triton) reads a batch-1 step's bytes well below a bare
read's speed (docs/kernels.md), and an earlier Pallas Triton kernel that only streamed the same
arrays was no faster, so the load pipeline, not the arithmetic, bounds it there. This probe
measures the ceiling of the alternative: a Mosaic GPU kernel with the attention kernel's grid
(kv-head row, split) whose programs only copy their slice of the cache into shared memory block
by block with TMA (`plgpu.emit_pipeline`, no arithmetic), against XLA's sum of the same uint8
array (a slow path of XLA's, slower than the quantized-attention benchmark's float32
reductions of the same bytes: compare with those; figures in docs/kernels.md, section "H200
experiments at batch 1 (2026-12-04, afternoon)"). Shapes are the int8 and int4-store caches of
the quantized-attention benchmark (32k slots, 8 kv-heads per sequence, head_dim 128): int8 keys
+ values are 256 bytes per slot and head, the int4 store's codes + scales + zeros 160.

Times are GPU-side: each variant runs 4 calls (4 copies of the cache, more than the L2 holds)
3 times under `jax.profiler`; printed is the GPU time of its operations per call.
Needs JAX >= 0.11 on a Hopper GPU (the `plgpu.kernel(out_type=...)` signature).
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import tempfile

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SHAPES = {  # name: (kv-head rows = batch * 8, slots, bytes per slot and head)
    "int8_b1": (8, 32768, 256),
    "int4_b1": (8, 32768, 160),
    "int8_b16": (128, 32768, 256),
}
VARIANTS = [  # (splits, block, pipeline stages)
    (16, 64, 2), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 2), (64, 64, 4), (64, 128, 4)
]


def tma_stream(x, *, splits: int, block: int, stages: int):
    """Copies each program's slice of x [H, T, W] into shared memory, `block` rows at a time."""
    rows, slots, width = x.shape
    per_split = slots // splits

    def kernel(x_gmem, _out):
        part = x_gmem.at[lax.axis_index("h"), pl.ds(lax.axis_index("s") * per_split, per_split)]
        plgpu.emit_pipeline(
            lambda _, x_smem: None,
            grid=(per_split // block,),
            in_specs=[plgpu.BlockSpec((block, width), lambda i: (i, 0))],
            max_concurrent_steps=stages,
        )(part)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
        grid=(rows, splits),
        grid_names=("h", "s"),
    )(x)


def gpu_us_per_call(fn, inputs) -> float:
    """GPU time of all of fn's GPU operations per call, 3 rounds over `inputs` (JAX profiler)."""
    for x in inputs:
        jax.block_until_ready(fn(x))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready([fn(x) for x in inputs])
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in e["args"]["name"]
    }
    busy = sum(e["dur"] for e in events if e.get("ph") == "X" and e["pid"] in gpu)
    return busy / (3 * len(inputs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| cache | MB | reader | GPU us | TB/s |\n|---|---|---|---|---|")
    for name in args.shapes:
        shape = SHAPES[name]
        inputs = [jax.random.bits(jax.random.PRNGKey(i), shape, jnp.uint8) for i in range(4)]
        mb = inputs[0].size / 1e6
        readers = {"XLA sum": jax.jit(lambda x: jnp.sum(x, dtype=jnp.uint32))}
        for splits, block, stages in VARIANTS:
            readers[f"TMA stream, {splits} splits, block {block}, {stages} stages"] = jax.jit(
                functools.partial(tma_stream, splits=splits, block=block, stages=stages)
            )
        for reader, fn in readers.items():
            us = gpu_us_per_call(fn, inputs)
            print(f"| {name} | {mb:.0f} | {reader} | {us:.1f} | {mb / us:.2f} |", flush=True)
        del inputs


if __name__ == "__main__":
    main()
