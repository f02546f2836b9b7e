"""One decode step's attention over a long cache, Llama-3.1-8B shape, against the HBM floor.

  python benchmarks/quantized_attention_bench.py [--batch 1 16] [--slots 32768] [--sweep]
      [--formats kivi4 int4 int8 bf16 kivi2] [--variants '{"block": 128}' ...]

For each format (bf16 through XLA and through the Pallas kernel's dense path; MaxText int8; KIVI
int4 and int2: per-channel keys, per-token values; int4: the int4 store's per-token keys and
values; groups of 32, bf16 scales) and batch size it reports the bytes one step must read
(codes + scales + zeros + q), the floor time those bytes take at the device's read bandwidth
(measured here once with a large reduction), the measured time and its % of the floor, and the
time the fastest XLA reduction takes over one buffer of the same size, timed the same way (at
batch 1 a few us per call of host-side cost weigh on both; docs/kernels.md has GPU-side times).

Timing: a jitted chain of N attention calls (fresh q each, ordered by an optimization barrier
that launches nothing, caches rotating over enough copies to defeat the L2 cache, the outputs
returned stacked as one array) is run many times; the time per call is the slope between
a short and a long chain, which removes the fixed dispatch cost; the median of repeats is kept.
The kernel is the one `quantized_decode_attention` picks (on an H200: the Mosaic GPU kernel for
int8, the Triton kernel for the other formats); a variant's "implementation"
forces one. With --sweep the kernel is also timed under variants of its tuning options
(--variants replaces them) and the best is shown.
A Markdown table is printed last; --jsonl writes every measurement.

GPU-side times (no launch gaps): --profile skips the timing and calls each variant and each
same-size read 3 times, for Nsight Compute; benchmarks/ncu_times.py gives the command and turns
its CSV into a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.kv_packing import QuantizedTensor  # noqa: E402
from pallas_kernels.quantized_attention import quantized_decode_attention  # noqa: E402
from pallas_kernels.quantized_attention_reference import (  # noqa: E402
    quantized_decode_attention_reference,
)

HQ, HKV, D, GROUP = 32, 8, 128, 32
DESIGN_BW = 2.88e12  # H100 read bandwidth in DESIGN.md, for comparison only
L2_DEFEAT_BYTES = 200e6  # > 4x the H100's 50 MB L2

SWEEP = {  # kernel options tried with --sweep, per format ({} = the defaults)
    "kivi4": [{}, {"pairs": False}, {"dequant": "f32"}, {"block": 128}],
    "int4": [{}, {"pairs": False}, {"dequant": "f32"}, {"block": 128, "target_programs": 1024}],
    "int8": [{}, {"implementation": "pallas_gpu"}, {"implementation": "mosaic_gpu"}],
    "kivi2": [{}, {"dequant": "f32"}, {"block": 128}],
    "bf16": [{}],
}
BITS = {"kivi4": 4, "int4": 4, "kivi2": 2}


READS = {  # read-only traffic: three float32 reductions of a 1-D buffer of 4096 * k elements
    "sum all": jnp.sum,
    "sum rows": lambda a: jnp.sum(a.reshape(-1, 4096), axis=1),
    "sum columns": lambda a: jnp.sum(a.reshape(4096, -1), axis=0),
}


def read_bandwidth(n_bytes=4 << 30, reps=20):
    """Bytes/s of the fastest of the large `READS` (one call at a time, wall clock)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (n_bytes // 4,), jnp.float32)
    best = 0.0
    for name, red in READS.items():
        f = jax.jit(red)
        f(x).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        bw = n_bytes / statistics.median(times)
        print(f"  read bandwidth, {name}: {bw / 1e12:.2f} TB/s")
        best = max(best, bw)
    del x
    return best


def read_buffer(n_bytes, seed=0):
    """A float32 buffer of about n_bytes whose length every `READS` reshape accepts."""
    n = max(4096, n_bytes // 4 // 4096 * 4096)
    return jax.random.normal(jax.random.PRNGKey(seed), (n,), jnp.float32)


def same_size_read(n_bytes, queries, reps):
    """Seconds per call of the fastest of `READS` over one float32 buffer of n_bytes.

    Timed like the kernels (`time_per_call`; each reduction also scales by an element of its q,
    so calls on one buffer stay distinct), per-call host cost included: a reference for a call
    that only reads its bytes once. At tens of MB it lies well above the floor, by launch gaps
    rather than a slower read (docs/kernels.md, section "H100 run (2026-11-23, against a bare
    read of the same bytes)").
    """
    buffers = [(read_buffer(n_bytes, 0),)]
    copies = max(2, math.ceil(L2_DEFEAT_BYTES / buffers[0][0].nbytes))
    buffers += [(read_buffer(n_bytes, i),) for i in range(1, copies)]
    length = jnp.ones((queries[0].shape[0],), jnp.int32)
    best = math.inf
    for red in READS.values():
        fn = lambda q, x, l, red=red: (red(x * q[0, 0, 0].astype(jnp.float32)),)
        best = min(best, time_per_call(fn, buffers, queries, length, reps)[0])
    return best


def make_cache(fmt, key, b, t):
    """Random packed caches (codes uniformly random, scales in [0.01, 0.1], zeros normal)."""
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    scales = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, 0.01, 0.1).astype(
        jnp.bfloat16
    )
    zeros = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16)
    if fmt == "bf16":
        return (
            jax.random.normal(k1, (b, HKV, t, D), jnp.bfloat16),
            jax.random.normal(k2, (b, HKV, t, D), jnp.bfloat16),
        )
    if fmt == "int8":
        codes = lambda k: jax.lax.bitcast_convert_type(
            jax.random.bits(k, (b, HKV, t, D), jnp.uint8), jnp.int8
        )
        return (
            QuantizedTensor.int8(codes(k1), scales(k2, (b, HKV, t))),
            QuantizedTensor.int8(codes(k3), scales(k4, (b, HKV, t))),
        )
    bits = BITS[fmt]
    packed = lambda k: jax.random.bits(k, (b, HKV, t, D * bits // 8), jnp.uint8)
    if fmt == "int4":  # keys quantized like values
        k_groups = (b, HKV, t, D // GROUP)
        kq = QuantizedTensor(
            packed(k1), scales(k2, k_groups), zeros(k3, k_groups), bits, GROUP, "per_token"
        )
    else:
        k_groups = (b, HKV, t // GROUP, D)
        kq = QuantizedTensor(
            packed(k1), scales(k2, k_groups), zeros(k3, k_groups), bits, GROUP, "per_channel"
        )
    vq = QuantizedTensor(
        packed(k4),
        scales(k5, (b, HKV, t, D // GROUP)),
        zeros(k6, (b, HKV, t, D // GROUP)),
        bits,
        GROUP,
        "per_token",
    )
    return kq, vq


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def xla_dense_attention(q, k, v, length):
    """Plain XLA decode attention over bf16 K/V (the unquantized baseline)."""
    b, hq, d = q.shape
    qg = q.reshape(b, HKV, hq // HKV, d)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    s = jnp.where(jnp.arange(k.shape[2]) < length[:, None, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / l).reshape(b, hq, d), (m + jnp.log(l)).reshape(b, hq)


def time_per_call(fn, caches, queries, length, reps):
    """Median seconds per call: slope between chains of n and 4n calls (see module docstring)."""

    def chain(n):
        @jax.jit
        def run(qs, cs, length):
            # Each call's q depends on the previous output, so XLA cannot merge the calls' matrix
            # products over a shared cache (it does: independent bf16 einsums over one K got merged).
            # The link is an optimization barrier, not arithmetic, so it launches no kernel (the
            # elementwise link used before was a kernel of its own; docs/kernels.md). Both of the
            # barrier's results are used: when only q was, XLA dropped the previous output from
            # the barrier and batched the bf16 einsums again.
            outs = []
            for i in range(n):
                q = qs[i]
                if outs:
                    q, outs[-1] = jax.lax.optimization_barrier((q, outs[-1]))
                outs.append(fn(q, *cs[i % len(cs)], length)[0])
            # One stacked output: returning each call's output as its own array cost dispatch
            # time per call, which the slope counted (docs/kernels.md, section "H200 experiments
            # at batch 1 (2026-12-04, afternoon)").
            return jnp.stack(outs)

        return run

    n_long = len(queries)
    n_short = max(1, n_long // 4)
    runs = {n: chain(n) for n in (n_short, n_long)}
    medians = {}
    for n, run in runs.items():
        args = (queries[:n], caches, length)
        for _ in range(3):
            jax.block_until_ready(run(*args))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*args))
            times.append(time.perf_counter() - t0)
        medians[n] = statistics.median(times)
    return (medians[n_long] - medians[n_short]) / (n_long - n_short), medians[n_long] / n_long


def attention_fn(impl, opts):
    if impl == "xla":
        return xla_dense_attention
    return lambda q, k, v, l: quantized_decode_attention(q, k, v, l, **opts)


def profile_calls(variants, cache, q, length, step_bytes):
    """Three untimed calls of each variant and of each same-size read (for `ncu`: GPU-side
    kernel times without launch gaps; docs/kernels.md gives the command)."""
    x = read_buffer(step_bytes)
    for red in READS.values():
        f = jax.jit(red)
        for _ in range(3):
            f(x).block_until_ready()
    for impl, opts in variants:
        f = jax.jit(attention_fn(impl, opts))
        for _ in range(3):
            jax.block_until_ready(f(q, *cache, length))
        print(f"  profiled {impl} {json.dumps(opts)}", flush=True)


def check_against_reference(caches, queries, length):
    k, v = caches[0]
    out, lse = jax.jit(quantized_decode_attention)(queries[0], k, v, length)
    ref, ref_lse = jax.jit(quantized_decode_attention_reference)(queries[0], k, v, length)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--slots", type=int, default=32768)
    ap.add_argument("--formats", nargs="+", default=["kivi4", "int4", "int8", "bf16", "kivi2"])
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tuning variants too")
    ap.add_argument(
        "--variants", nargs="+", type=json.loads, default=None,
        help="kernel options (JSON objects) to time for every format instead of the sweep's",
    )
    ap.add_argument(
        "--profile", action="store_true",
        help="no timing: call each variant and the same-size reads 3 times, for Nsight Compute",
    )
    ap.add_argument("--calls", type=int, default=16, help="calls in the long timing chain")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--jsonl", type=Path, default=None)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=1e9,
        help="seconds after which sweep variants are skipped (defaults still run)",
    )
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__},"
        f" {datetime.date.today()}",
        flush=True,
    )
    if args.profile:  # the floor is not used: ncu gives the times
        bw = math.nan
    else:
        bw = read_bandwidth()
        print(
            f"read bandwidth used for the floor: {bw / 1e12:.2f} TB/s, the fastest 4 GiB"
            f" reduction (DESIGN.md: {DESIGN_BW / 1e12:.2f} TB/s)",
            flush=True,
        )
    log = open(args.jsonl, "w") if args.jsonl else None
    t_start = time.perf_counter()
    rows = []
    for fmt in args.formats:
        for b in args.batch:
            length = jnp.full((b,), args.slots, jnp.int32)
            one = make_cache(fmt, jax.random.PRNGKey(1), b, args.slots)
            step_bytes = nbytes(one) + b * HQ * D * 2
            # ncu flushes the caches itself: --profile needs one copy
            n_sets = 1 if args.profile else max(2, math.ceil(L2_DEFEAT_BYTES / step_bytes))
            caches = [one] + [
                make_cache(fmt, jax.random.PRNGKey(2 + i), b, args.slots) for i in range(n_sets - 1)
            ]
            queries = [
                jax.random.normal(jax.random.PRNGKey(100 + i), (b, HQ, D), jnp.bfloat16)
                for i in range(args.calls)
            ]
            floor = step_bytes / bw
            variants = [("xla", None)] if fmt == "bf16" else []
            options = args.variants or (SWEEP[fmt] if args.sweep else [{}])
            variants += [("pallas", opts) for opts in options]
            if args.profile:
                profile_calls(variants, caches[0], queries[0], length, step_bytes)
                continue
            read = same_size_read(step_bytes, queries, args.reps)
            try:
                err = check_against_reference(caches, queries, length)
            except Exception as e:  # report and go on to the timings
                print(f"{fmt} b={b}: reference check FAILED {type(e).__name__}: {str(e)[:300]}")
                err = float("nan")
            print(
                f"{fmt} batch {b}: {step_bytes / 1e6:.1f} MB/step, floor {floor * 1e6:.1f} us,"
                f" same-size read {read * 1e6:.1f} us,"
                f" {n_sets} cache copies, kernel vs reference rel err {err:.1e}",
                flush=True,
            )
            for impl, opts in variants:
                if opts and time.perf_counter() - t_start > args.time_budget:
                    print(f"  {fmt} b={b} {opts}: skipped (time budget)")
                    continue
                t_variant = time.perf_counter()
                try:
                    t, t_plain = time_per_call(
                        attention_fn(impl, opts), caches, queries, length, args.reps
                    )
                except Exception as e:  # a variant that does not compile must not stop the others
                    print(f"  {fmt} b={b} {impl} {opts}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                rec = dict(
                    format=fmt,
                    batch=b,
                    impl=impl,
                    options=opts,
                    bytes=step_bytes,
                    floor_us=floor * 1e6,
                    time_us=t * 1e6,
                    time_us_no_slope=t_plain * 1e6,
                    pct_floor=100 * floor / t,
                    same_size_read_us=read * 1e6,
                    pct_same_size_read=100 * read / t,
                    rel_err_vs_reference=err,
                    cache_sets=n_sets,
                )
                print(
                    f"  {fmt:5s} b={b:2d} {impl:6s} {json.dumps(opts):28s} {t * 1e6:9.1f} us"
                    f" ({t_plain * 1e6:8.1f} unsloped)  {100 * floor / t:5.1f}% of floor"
                    f"  [{time.perf_counter() - t_variant:.0f}s]",
                    flush=True,
                )
                if log:
                    log.write(json.dumps(rec) + "\n")
                rows.append(rec)
            del caches, one
    if args.profile:
        return

    print(
        "\n| format | batch | impl | options | bytes read (MB) | floor (us) | time (us) |"
        " % of floor | same-size read (us) | % of it | time incl. dispatch (us) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best = {}
    for r in rows:
        key = (r["format"], r["batch"], r["impl"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    for r in best.values():
        print(
            f"| {r['format']} | {r['batch']} | {r['impl']} | {json.dumps(r['options']) if r['options'] else '-'} |"
            f" {r['bytes'] / 1e6:.1f} | {r['floor_us']:.1f} | {r['time_us']:.1f} |"
            f" {r['pct_floor']:.0f}% | {r['same_size_read_us']:.1f} |"
            f" {r['pct_same_size_read']:.0f}% | {r['time_us_no_slope']:.1f} |"
        )
    print(
        f"\nfloor = bytes / {bw / 1e12:.2f} TB/s (measured read bandwidth, fastest large"
        " reduction); time = median per call, slope of chained calls; same-size read = the"
        " fastest XLA reduction over one buffer of the step's bytes, timed the same way."
    )


if __name__ == "__main__":
    main()
