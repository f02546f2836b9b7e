"""GPU-side times from Nsight Compute's CSV of `quantized_attention_bench.py --profile`.

  XLA_FLAGS=--xla_gpu_autotune_level=0 ncu --clock-control none \
      --kernel-name regex:"quantized|merge|reduce" --metrics gpu__time_duration.sum \
      --csv --log-file ncu.csv \
      python benchmarks/quantized_attention_bench.py --profile --formats int8 int4 --batch 1 16
  python benchmarks/ncu_times.py ncu.csv --formats int8 int4 --batch 1 16 [--variants JSON ...]

(On the H200 on 2026-12-04 the profiled process crashed during XLA's autotuning; with it off,
as above, it ran. Autotuning picks XLA's own GEMM configurations, not the Pallas kernels.)

The profile calls, for each format and then each batch: the three same-size reductions 3 times
each, then each kernel variant 3 times (attention kernel, then the split merge if there is more
than one split). For each group the script prints the median of the 3 calls of each variant (attention
+ merge) and of the fastest reduction, which reads the same number of bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

def kernel_rows(path: Path) -> list[tuple[str, float]]:
    """(kernel name, microseconds) for each profiled launch, in launch order."""
    lines = [l for l in path.read_text().splitlines() if not l.startswith("==")]
    rows = []
    for r in csv.DictReader(lines):
        if r["Metric Name"] == "gpu__time_duration.sum":
            scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3}[r["Metric Unit"]]
            rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * scale))
    return rows


def split_groups(rows):
    """Launches grouped per (format, batch): a reduction after an attention launch starts one."""
    groups, reading = [], False
    for name, us in rows:
        is_read = "reduce" in name
        if is_read and not reading:
            groups.append(([], []))
        reading = is_read
        groups[-1][0 if is_read else 1].append((name, us))
    return groups


def read_calls(launches) -> list[float]:
    """Time of each reduction call: one launch reads the buffer (XLA names it
    `input_reduce_fusion` with or without a number) and smaller ones finish the reduction
    after it, so a launch of at least half the longest starts a call."""
    longest = max(us for _, us in launches)
    calls = []
    for _, us in launches:
        if us >= longest / 2 or not calls:
            calls.append(us)
        else:
            calls[-1] += us
    return calls


def attention_calls(launches) -> list[tuple[float, float]]:
    """(attention, merge) microseconds of each attention call; merge 0 when there is none."""
    calls = []
    for name, us in launches:
        if "merge" in name:
            calls[-1] = (calls[-1][0], us)
        else:
            calls.append((us, 0.0))
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--formats", nargs="+", required=True)
    ap.add_argument("--batch", type=int, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", type=json.loads, default=[{}])
    args = ap.parse_args(argv)

    labels = [(f, b) for f in args.formats for b in args.batch]
    groups = split_groups(kernel_rows(args.csv))
    if len(groups) != len(labels):
        raise SystemExit(f"error: {len(groups)} profiled groups in the CSV, {len(labels)} expected")
    print("| format | batch | options | attention (us) | merge (us) | together (us) |"
          " fastest same-size read (us) | % of that read |")
    print("|---|---|---|---|---|---|---|---|")
    for (fmt, b), (reads, attention) in zip(labels, groups):
        calls = read_calls(reads)
        if len(calls) != 9:
            raise SystemExit(f"error: {fmt} b={b}: {len(calls)} reduction calls, 9 expected")
        read = min(statistics.median(calls[i:i + 3]) for i in range(0, 9, 3))
        calls = attention_calls(attention)
        if len(calls) != 3 * len(args.variants):
            raise SystemExit(f"error: {fmt} b={b}: {len(calls)} attention calls, "
                             f"{3 * len(args.variants)} expected")
        for i, opts in enumerate(args.variants):
            mine = calls[3 * i:3 * i + 3]
            kernel = statistics.median(a for a, _ in mine)
            merge = statistics.median(m for _, m in mine)
            total = statistics.median(a + m for a, m in mine)
            print(f"| {fmt} | {b} | {json.dumps(opts)} | {kernel:.1f} | {merge:.1f} |"
                  f" {total:.1f} | {read:.1f} | {100 * read / total:.0f}% |")


if __name__ == "__main__":
    main()
