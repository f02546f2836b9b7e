"""Command line: prefill and decode throughput, KV and peak memory, against the HBM roofline.

    python -m engine.benchmark --preset=llama-3.1-8b --context_length=32768 \\
        --methods=none,snapkv --compression_ratio=0.75 --batch_sizes=1,max --peer

Weights are random in the preset's real shapes (speed does not depend on their values). For each
method and batch size it reports prefill tokens/s (compression included), decode tokens/s, and
the decode step's time against its floor: the bytes a step must read (every weight once, the
embedding rows aside, plus the KV state the method keeps) over the measured HBM read bandwidth.
A first run of one prefill group pays the compiled programs' first execution (module loading,
autotuning), which is not throughput; then the measured run. `max` picks the largest batch the
memory model says fits; a batch that does not fit is refused before anything runs. `--peer` first
runs the same workload through HF transformers + kvpress (`benchmarks/peer_kvpress.py`, batch 1)
in a subprocess, so both sides are measured in one run.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from compression.base import Budget
from compression.registry import make_compression
from compression.select import round_up
from engine import cli
from engine.generation import bucket, generate
from engine.memory import MemoryModel, device_memory_bytes, sequence_state_bytes
from models.config import PRESETS
from models.params import declared_param_bytes, init_random_params, param_bytes

_PRESET = flags.DEFINE_enum("preset", "smollm2-135m", list(PRESETS), "Model shape.")
_CONTEXT = flags.DEFINE_integer("context_length", 4096, "Context tokens per sequence.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes; 'max' is the largest that fits.")
_METHODS = flags.DEFINE_list("methods", ["none"], "Compression specs (see engine.generate).")
_RATIO = flags.DEFINE_float("compression_ratio", 0.75, "Ratio for the compressed methods.")
_STEPS = flags.DEFINE_integer("decode_steps", 64, "Tokens generated per sequence.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and KV dtype.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", None, "Device memory (default: what JAX reports; "
                                 "on a CPU, which reports none, the host's memory).")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 1, "Contexts prefilled at a time.")
_PEER = flags.DEFINE_bool("peer", False, "Also run HF transformers + kvpress (batch 1).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this file.")


def read_bandwidth() -> float:
    """Bytes/s of a large on-device reduction (read-only traffic), the best of several runs."""
    x = jnp.ones((2**30,), jnp.float32)  # 4 GiB
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return x.nbytes / min(times)


def step_weight_bytes(params) -> int:
    """Weights a decode step reads: all but the embedding table, which only gives its rows (a
    tied embedding is read whole as the output head)."""
    embed = params.embed.size * params.embed.dtype.itemsize
    return param_bytes(params) - (embed if params.lm_head is not None else 0)


def run_peer(method: str) -> dict | None:
    if method not in ("none", "snapkv", "pyramidkv", "knorm", "tova", "streamingllm",
                      "expected_attention"):
        return None
    command = [sys.executable, "-m", "benchmarks.peer_kvpress", f"--preset={_PRESET.value}",
               f"--context_length={_CONTEXT.value}", f"--method={method}",
               f"--compression_ratio={_RATIO.value}", f"--decode_steps={_STEPS.value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"peer run failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def measure(params, config, method: str, batch_spec: str, bandwidth: float, limit: int) -> dict:
    itemsize = jnp.dtype(_DTYPE.value).itemsize
    budget = Budget(ratio=_RATIO.value) if method != "none" else None
    compression = make_compression(method, budget)
    padded = bucket(_CONTEXT.value)
    after = round_up(_STEPS.value)
    sequence_bytes = sequence_state_bytes(config, compression, _CONTEXT.value, padded, after,
                                          jnp.dtype(_DTYPE.value))
    weights = declared_param_bytes(config, jnp.dtype(_DTYPE.value))
    memory = MemoryModel(config, weights, itemsize, padded, sequence_bytes,
                         compressed=compression is not None)
    group = _PREFILL_BATCH.value
    batch = memory.largest_batch(limit, group) if batch_spec == "max" else int(batch_spec)
    memory.check(batch, group, limit)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (batch, _CONTEXT.value)).tolist()
    generate(params, config, prompts[:group], _STEPS.value, compression=compression,
             prefill_batch=group)  # pays the prefill's and compression's first executions
    result = generate(params, config, prompts, _STEPS.value, compression=compression,
                      prefill_batch=group)
    steps = _STEPS.value - 1  # the first token comes from the prefill's logits
    step_seconds = result.decode_seconds / steps
    step_bytes = step_weight_bytes(params) + result.kv_bytes
    floor = step_bytes / bandwidth
    return dict(method=method, batch=batch, context=_CONTEXT.value,
                prefill_tok_s=batch * _CONTEXT.value / result.prefill_seconds,
                compression_share=result.compression_seconds / result.prefill_seconds,
                decode_tok_s=batch * steps / result.decode_seconds,
                step_ms=1e3 * step_seconds, floor_ms=1e3 * floor, of_floor=floor / step_seconds,
                kv_gib=result.kv_bytes / 2**30,
                predicted_peak_gib=memory.peak_bytes(batch, group) / 2**30)


def table(rows: list[dict]) -> str:
    """Markdown table of the rows. "prefill vs none": how much longer the method's whole prefill
    (observing, scoring, compressing) takes than the uncompressed one's at the same batch."""
    lines = ["| method | batch | prefill tok/s | prefill vs none | scoring share | decode tok/s "
             "| step ms | floor ms | of floor | KV GiB | peak GiB (pred.) | vs kvpress |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    uncompressed = {r["batch"]: r["prefill_tok_s"] for r in rows if r["method"] == "none"}
    for r in rows:
        peer = r.get("peer_decode_tok_s")
        versus = f"{r['decode_tok_s'] / peer:.1f}x ({peer:.1f} tok/s)" if peer else ""
        base = uncompressed.get(r["batch"]) if r["method"] != "none" else None
        slower = f"{100 * (base / r['prefill_tok_s'] - 1):+.1f}%" if base else ""
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {slower} | "
            f"{100 * r['compression_share']:.1f}% | {r['decode_tok_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['floor_ms']:.2f} | {100 * r['of_floor']:.0f}% | {r['kv_gib']:.2f} | "
            f"{r['predicted_peak_gib']:.1f} | {versus} |")
    return "\n".join(lines)


def run() -> None:
    peers = {m: run_peer(m) for m in _METHODS.value} if _PEER.value else {}
    config = PRESETS[_PRESET.value]
    config = type(config)(**{**config.__dict__, "eos_token_ids": ()})  # never stop early
    params = jax.jit(init_random_params, static_argnums=(0, 2))(
        config, jax.random.key(0), jnp.dtype(_DTYPE.value))
    bandwidth = read_bandwidth()
    limit = device_memory_bytes(_MEMORY_GB.value)
    rows = []
    for method in _METHODS.value:
        for batch in _BATCHES.value:
            row = measure(params, config, method, batch, bandwidth, limit)
            peer = peers.get(method)
            if peer and row["batch"] == 1:
                row.update(peer_decode_tok_s=peer["decode_tok_s"],
                           peer_prefill_tok_s=peer["prefill_tok_s"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{_PRESET.value}, context {_CONTEXT.value}, {_DTYPE.value}, ratio {_RATIO.value} for "
          f"compressed methods, {jax.devices()[0].device_kind}, read bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, memory {limit / 2**30:.1f} GiB")
    for method, peer in peers.items():
        if peer:
            print(f"peer HF+kvpress {method}: prefill {peer['prefill_tok_s']:.0f} tok/s, "
                  f"decode {peer['decode_tok_s']:.1f} tok/s")
    print(table(rows))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dict(rows=rows, peers=peers), f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    cli.main(run)
