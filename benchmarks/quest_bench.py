"""Quest's decode-step attention against full attention, Llama-3.1-8B shape, on one GPU.

    python benchmarks/quest_bench.py [--batch 1 8] [--context 32768] [--budgets 1024 2048 4096]

One layer's attention for one decode step: 32 query heads, 8 kv-heads, head_dim 128, bf16, a
full cache of `--context` tokens in pages of 16. Rows:
- full attention over the whole cache: plain XLA, and the Pallas dense kernel of
  `pallas_kernels/quantized_attention_gpu.py` (raw bf16 path);
- Quest at each token budget: the page-score and top-K kernels (`quest_select`) followed by the
  sparse attention kernel (`quest_decode_attention`); with --breakdown also each part alone.

Bytes counted for Quest are what a step must read: the page metadata (min and max, 2 * D values
per page and kv-head), the selected pages' keys and values, and the queries. The floor is those
bytes over the device's read bandwidth (measured here with a large reduction); "% of floor" is
floor / time.

Timing: a jitted chain of N calls (each call's query depends on the previous output, so the calls
run one after another as decode steps do) is run many times; the time per call is the slope
between chains of N/4 and N calls (no dispatch cost), median of repeats. The calls rotate over
enough copies of the cache that the metadata and pages are not served from L2. Before timing,
the kernels are checked against the plain-JAX references on the benchmark's own inputs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.quantized_attention_bench import read_bandwidth  # noqa: E402
from pallas_kernels.quest_attention import quest_decode_attention  # noqa: E402
from pallas_kernels.quest_reference import page_metadata  # noqa: E402
from pallas_kernels.quest_select import quest_select, quest_select_with_scores  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
L2_DEFEAT_BYTES = 200e6  # > 4x the H100's 50 MB L2
KERNEL = dict(implementation="pallas_gpu")  # --interpret adds interpret=True (CPU smoke test)


def warm_up(seconds=2.0):
    """Busy matrix products, so that the clocks have left idle before anything is timed."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4096, 4096), jnp.bfloat16)
    f = jax.jit(lambda a: (a @ a).astype(jnp.bfloat16))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = f(x)
        x.block_until_ready()


def make_cache(key, b, t):
    """Random bf16 keys (a few loud channels, as post-RoPE keys have) and values, full length."""
    k1, k2 = jax.random.split(key)
    scale = jnp.ones((D,), jnp.float32).at[:4].set(4.0)
    keys = (jax.random.normal(k1, (b, HKV, t, D), jnp.float32) * scale).astype(jnp.bfloat16)
    values = jax.random.normal(k2, (b, HKV, t, D), jnp.bfloat16)
    lengths = jnp.full((b, HKV), t, jnp.int32)
    page_min, page_max = jax.jit(page_metadata, static_argnums=2)(keys, lengths, PAGE)
    return dict(keys=keys, values=values, page_min=page_min, page_max=page_max, lengths=lengths)


def xla_full_attention(q, c):
    b, hq, d = q.shape
    qg = q.reshape(b, HKV, hq // HKV, d)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, c["keys"], preferred_element_type=jnp.float32)
    s = s * d**-0.5
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgt,bhtd->bhgd", p.astype(jnp.bfloat16), c["values"],
                   preferred_element_type=jnp.float32)
    return (o / l).reshape(b, hq, d)


def pallas_full_attention(q, c):
    from pallas_kernels.quantized_attention import quantized_decode_attention
    return quantized_decode_attention(q, c["keys"], c["values"], c["lengths"][:, 0],
                                      **KERNEL)[0]


def quest_step(n_select, select_options=None, attend_options=None):
    def run(q, c):
        pages, count = quest_select(q, c["page_min"], c["page_max"], c["lengths"], PAGE, n_select,
                                    **KERNEL, **(select_options or {}))
        return quest_decode_attention(q, c["keys"], c["values"], c["lengths"], pages, count, PAGE,
                                      **KERNEL, **(attend_options or {}))[0]
    return run


def select_only(n_select, **options):
    def run(q, c):
        pages, count = quest_select(q, c["page_min"], c["page_max"], c["lengths"], PAGE, n_select,
                                    **KERNEL, **options)
        return (pages[:, :, :1] + count[..., None]).astype(jnp.float32)
    return run


def attention_only(n_select, n_pages, **options):
    def run(q, c):
        b = q.shape[0]
        # A fixed spread of pages (the newest last), as the selection would return them.
        pages = jnp.broadcast_to(jnp.linspace(0, n_pages - 1, n_select).astype(jnp.int32),
                                 (b, HKV, n_select))
        count = jnp.full((b, HKV), n_select, jnp.int32)
        return quest_decode_attention(q, c["keys"], c["values"], c["lengths"], pages, count, PAGE,
                                      **KERNEL, **options)[0]
    return run


# Tuning variants timed with --sweep (budget 1024), against the defaults (select: 128 pages per
# scoring program, 4 warps, 1 bit per radix round; attention: ~256 programs, >= 2 loop steps each).
SELECT_SWEEP = [dict(pages_per_block=64, select_warps=8), dict(radix_bits=2)]
ATTEND_SWEEP = [dict(target_programs=128, min_blocks_per_split=1)]


def time_per_call(fn, caches, queries, reps):
    """Median seconds per call: slope between chains of n/4 and n calls."""
    def chain(n):
        @jax.jit
        def run(qs, cs):
            out = None
            for i in range(n):
                q = qs[i] if out is None else qs[i] + (out[0, 0, 0] * 0).astype(qs[i].dtype)
                out = fn(q, cs[i % len(cs)])
            return out
        return run

    n_long = len(queries)
    n_short = max(1, n_long // 4)
    medians = {}
    for n in (n_short, n_long):
        run = chain(n)
        for _ in range(2):
            jax.block_until_ready(run(queries[:n], caches))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(queries[:n], caches))
            times.append(time.perf_counter() - t0)
        medians[n] = statistics.median(times)
    return (medians[n_long] - medians[n_short]) / (n_long - n_short)


def check(cache, q, n_select):
    """Kernels vs references on the benchmark's inputs: fraction of identical selected pages
    (bf16 scores: sums in another order can swap near-tied pages) and the sparse attention's
    relative error over the same pages."""
    args = (q, cache["page_min"], cache["page_max"], cache["lengths"], PAGE, n_select)
    select = jax.jit(quest_select_with_scores, static_argnums=(4, 5),
                     static_argnames=("implementation", "interpret"))
    _, pages, count = select(*args, **KERNEL)
    _, ref_pages, ref_count = select(*args, implementation="reference")
    same = np.mean([len(set(a) & set(r)) / len(r) for a, r in zip(
        np.asarray(pages).reshape(-1, n_select), np.asarray(ref_pages).reshape(-1, n_select))])
    attend = jax.jit(quest_decode_attention, static_argnums=6,
                     static_argnames=("implementation", "interpret"))
    kv = (cache["keys"], cache["values"], cache["lengths"], ref_pages, ref_count, PAGE)
    out, _ = attend(q, *kv, **KERNEL)
    ref, _ = attend(q, *kv, implementation="reference")
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    return same, bool(np.array_equal(count, ref_count)), err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--calls", type=int, default=32, help="calls in the long timing chain")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--breakdown", action="store_true", help="time selection and attention alone")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds after which optional rows are skipped")
    ap.add_argument("--sweep", action="store_true", help="time tuning variants of the kernels")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU check)")
    args = ap.parse_args(argv)
    if args.interpret:
        KERNEL["interpret"] = True
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__},"
          f" {datetime.date.today()}", flush=True)
    warm_up()
    bw = read_bandwidth(2 << 30, reps=15)
    print(f"read bandwidth (fastest 2 GiB reduction): {bw / 1e12:.2f} TB/s", flush=True)
    t, n_pages = args.context, args.context // PAGE
    rows = []
    for b in args.batch:
        meta_bytes = 2 * b * HKV * n_pages * D * 2
        q_bytes = b * HQ * D * 2
        full_bytes = 2 * b * HKV * t * D * 2 + q_bytes
        quest_bytes = {k: meta_bytes + 2 * b * HKV * (k // PAGE) * PAGE * D * 2 + q_bytes
                       for k in args.budgets}
        copies = max(2, min(16, math.ceil(L2_DEFEAT_BYTES / min(quest_bytes.values()))))
        caches = [make_cache(jax.random.PRNGKey(10 + i), b, t) for i in range(copies)]
        queries = [jax.random.normal(jax.random.PRNGKey(100 + i), (b, HQ, D), jnp.bfloat16)
                   for i in range(args.calls)]
        for k in args.budgets:
            same, count_ok, err = check(caches[0], queries[0], k // PAGE)
            print(f"b={b} budget {k}: kernel pages = reference pages for {100 * same:.2f}%,"
                  f" counts equal {count_ok}, sparse attention rel err {err:.1e}", flush=True)
        variants = [("full", "xla", xla_full_attention, full_bytes),
                    ("full", "pallas", pallas_full_attention, full_bytes)]
        for k in args.budgets:
            variants.append((f"quest {k}", "select+attend", quest_step(k // PAGE), quest_bytes[k]))
            if args.breakdown:
                variants.append((f"quest {k}", "select only", select_only(k // PAGE),
                                 meta_bytes + q_bytes))
                variants.append((f"quest {k}", "attend only", attention_only(k // PAGE, n_pages),
                                 quest_bytes[k] - meta_bytes))
        if args.sweep:
            k = 1024 if 1024 in args.budgets else args.budgets[0]
            variants += [(f"quest {k}", f"select {o}", select_only(k // PAGE, **o),
                          meta_bytes + q_bytes) for o in SELECT_SWEEP]
            variants += [(f"quest {k}", f"attend {o}", attention_only(k // PAGE, n_pages, **o),
                          quest_bytes[k] - meta_bytes) for o in ATTEND_SWEEP]
        for name, impl, fn, n_bytes in variants:
            optional = impl.startswith(("select", "attend")) or impl == "pallas"
            if optional and time.perf_counter() - t_start > args.time_budget:
                print(f"  {name} {impl} b={b}: skipped (time budget)")
                continue
            try:
                seconds = time_per_call(fn, caches, queries, args.reps)
            except Exception as e:  # one variant that fails must not stop the others
                print(f"  {name} {impl} b={b}: FAILED {type(e).__name__}: {str(e)[:400]}")
                continue
            rows.append(dict(batch=b, name=name, impl=impl, bytes=n_bytes, us=seconds * 1e6,
                             floor_us=n_bytes / bw * 1e6))
            print(f"  b={b} {name:10s} {impl:34s} {seconds * 1e6:8.1f} us  {n_bytes / 1e6:7.1f} MB"
                  f"  {100 * n_bytes / bw / seconds:5.1f}% of floor"
                  f"  [{time.perf_counter() - t_start:.0f}s]", flush=True)
        del caches

    print("\n| batch | attention | impl | bytes read (MB) | floor (us) | time (us) | % of floor |"
          " speed-up vs best full |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        mine = [r for r in rows if r["batch"] == b]
        full = min((r["us"] for r in mine if r["name"] == "full"), default=float("nan"))
        for r in mine:
            print(f"| {b} | {r['name']} | {r['impl']} | {r['bytes'] / 1e6:.1f} |"
                  f" {r['floor_us']:.1f} | {r['us']:.1f} | {100 * r['floor_us'] / r['us']:.0f}% |"
                  f" {full / r['us']:.2f}x |")
    print(f"\ncontext {t} tokens, pages of {PAGE}, {HQ} query / {HKV} kv heads, head_dim {D}, bf16;"
          f" floor = bytes / {bw / 1e12:.2f} TB/s (measured read bandwidth).")


if __name__ == "__main__":
    main()
