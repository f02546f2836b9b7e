"""`python -m engine.generate` (and `engine.benchmark`) answer bad input with one line and a
non-zero exit."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from checkpoints_convert.load import default_checkpoint_path
from engine.memory import MemoryModel, sequence_state_bytes
from models.config import PRESETS
from models.params import init_random_params, param_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, module="engine.generate"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("--prompt=hi", f"--checkpoint={tmp_path}/nothing.gguf"),
                          "not found")


def test_truncated_gguf(tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(default_checkpoint_path(), "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_one_line_error(run_cli("--prompt=hi", f"--checkpoint={truncated}"), "truncated")


def test_truncated_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    assert_one_line_error(run_cli("--prompt=hi", f"--checkpoint={tmp_path}"))


def test_unknown_compression_method_lists_the_methods():
    assert_one_line_error(run_cli("--prompt=hi", "--compress=magic"), "magic", "none")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_max_new_tokens(value):
    assert_one_line_error(run_cli("--prompt=hi", f"--max_new_tokens={value}"), "max_new_tokens")


def test_prompt_longer_than_the_context(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the cat sat on the mat. " * 1700)  # ~10k tokens > SmolLM2's 8192
    assert_one_line_error(run_cli(f"--prompt_file={prompt}", "--max_new_tokens=4"), "context")


def test_default_model_answers_a_question():
    result = run_cli("--prompt=What is the capital of France?", "--chat", "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "decode" in result.stdout and "KV cache" in result.stdout


@pytest.mark.parametrize("flags,fragment", [
    (["--compress=snapkv", "--compression_ratio=1.0"], "[0, 1)"),
    (["--compress=snapkv", "--compression_ratio=-0.1"], "[0, 1)"),
    (["--compress=snapkv", "--kv_budget=0"], "positive"),
    (["--compress=snapkv", "--kv_budget=-5"], "positive"),
    (["--compress=snapkv:adakv"], "compose"),
    (["--compress=adakv:adakv"], "compose"),
    (["--compress=knorm", "--kv_budget=64", "--decode_eviction"], "decode-time"),
    (["--compress=tova", "--compression_ratio=0.5", "--decode_eviction"], "kv_budget"),
    (["--compression_ratio=0.5"], "need a --compress"),
])
def test_bad_compression_flags(flags, fragment):
    assert_one_line_error(run_cli("--prompt=hi", *flags), fragment)


def test_compressed_run_reports_smaller_context_kv():
    result = run_cli("--context=" + "Alice met Bob at the market. " * 60,
                     "--question=Who met Bob?", "--compress=pyramidkv",
                     "--compression_ratio=0.75", "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.split("context KV ")[1].split(" | ")[0].split(" -> ")
    assert float(after.split()[0]) < 0.3 * float(before.split()[0])


def test_benchmark_refuses_a_batch_that_cannot_fit_and_names_the_largest():
    config = PRESETS["smollm2-135m"]
    weights = param_bytes(jax.eval_shape(lambda: init_random_params(
        config, jax.random.key(0), jnp.float32)))
    memory = MemoryModel(config, weights, 4, padded_length=2048,
                         sequence_bytes=sequence_state_bytes(config, None, 2048, 2048, 16,
                                                             jnp.float32),
                         compressed=False)
    limit = 6 * 2**30
    largest = memory.largest_batch(limit, 1)
    per_row = memory.decode_state_bytes(1)  # independent check: the KV of one more row overflows
    assert memory.peak_bytes(largest, 1) <= limit < memory.peak_bytes(largest, 1) + per_row
    result = run_cli("--preset=smollm2-135m", "--context_length=2048", "--decode_steps=16",
                     "--dtype=float32", f"--batch_sizes={largest + 1}", "--memory_gb=6",
                     module="engine.benchmark")
    assert_one_line_error(result, f"batch {largest + 1} needs",
                          f"largest batch that fits is {largest}")


def test_a_budget_a_store_alone_would_ignore_is_refused():
    assert_one_line_error(run_cli("--prompt=hi", "--compress=kivi4", "--kv_budget=16"),
                          "keeps every context token")
