"""Every failure a user can cause ends in one stderr line and a known exit status: damaged or
mismatched checkpoint files (`error: <file>: <problem>`, status 1), text files that are not UTF-8
(or read with --encoding), Ctrl-C (`interrupted`, status 130); and engine.benchmark on a CPU
sizes batches by the host's memory instead of stopping."""

import os
import shutil
import signal
import time

import jax
import pytest

from checkpoints_convert.orbax_store import FILE_SIZES
from engine.memory import device_memory_bytes
from tests.tiny_checkpoint import assert_one_line, run_cli, start_cli, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def damaged(tiny, tmp_path):
    """A copy of the tiny checkpoint to damage."""
    return shutil.copytree(tiny, tmp_path / "copy")


def generate(checkpoint, *flags):
    return run_cli("engine.generate", "--prompt=hi", "--max_new_tokens=2",
                   f"--checkpoint={checkpoint}", *flags)


def assert_error(result, *fragments) -> str:
    assert result.returncode == 1
    return assert_one_line(result, "error: ", *fragments)


def largest_data_file(checkpoint):
    files = [p for p in (checkpoint / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_orbax_data_file_cut_short_is_named(damaged):
    data = largest_data_file(damaged)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    assert_error(generate(damaged), f"{data}: ", "bytes, but", "convert the checkpoint again")


def test_orbax_data_cut_short_without_file_sizes_is_one_line(damaged):
    """A checkpoint written by Orbax alone: the failure comes from Orbax's read, as one line."""
    (damaged / "params" / FILE_SIZES).unlink()
    data = largest_data_file(damaged)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    assert_error(generate(damaged), "cannot restore the checkpoint", "OUT_OF_RANGE")


def test_damaged_orbax_metadata_is_one_line(damaged):
    metadata = damaged / "params" / "_METADATA"
    metadata.write_bytes(b"\x00" * metadata.stat().st_size)  # same size: only Orbax can tell
    assert_error(generate(damaged), str(damaged / "params"), "Orbax metadata")


@pytest.mark.parametrize("damage,fragment", [
    (lambda text: text[:len(text) // 2], "not valid JSON"),
    (lambda text: "\udcff" + text, "not UTF-8 text"),
    (lambda text: text.replace('"num_layers"', '"layers"'), "unknown fields ['layers']"),
    (lambda text: text.replace('"num_layers": 2', '"num_layers": "2"'), "num_layers is '2', not int"),
])
def test_truncated_or_invalid_engine_config_is_named(damaged, damage, fragment):
    path = damaged / "engine_config.json"
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape"))
    assert_error(generate(damaged), f"{path}: ", fragment)


def test_config_and_parameters_from_different_models_are_refused(damaged):
    path = damaged / "engine_config.json"
    path.write_text(path.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    assert_error(generate(damaged), str(damaged / "params"), "no array 'layers.2.")
    path.write_text(path.read_text().replace('"num_layers": 3', '"num_layers": 1'))
    assert_error(generate(damaged), str(damaged / "params"), "does not ask for", "'layers.1.")


def test_truncated_tokenizer_config_is_named(damaged):
    path = damaged / "tokenizer_config.json"
    path.write_text(path.read_text()[:40])
    assert_error(generate(damaged), f"{path}: not valid JSON")


def test_invalid_hf_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert_error(run_cli("engine.convert", f"--source={tmp_path}", f"--output={tmp_path}/out"),
                 f"{tmp_path / 'config.json'}: not valid JSON")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert_error(generate(tmp_path), f"{tmp_path / 'config.json'}: lacks")


@pytest.mark.parametrize("flag", ["prompt_file", "context_file"])
def test_text_file_that_is_not_utf8_is_one_line(tiny, tmp_path, flag):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    result = run_cli("engine.generate", f"--{flag}={path}", "--max_new_tokens=2",
                     f"--checkpoint={tiny}")
    assert_error(result, f"--{flag} {path}: not utf-8 text (byte 0xe9 at offset 3)", "--encoding")


def test_explicit_encoding_reads_the_file(tiny, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    result = run_cli("engine.generate", f"--prompt_file={path}", "--encoding=latin-1",
                     "--max_new_tokens=2", f"--checkpoint={tiny}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 2 tokens" in result.stdout
    assert_error(run_cli("engine.generate", f"--prompt_file={path}", "--encoding=klingon",
                         f"--checkpoint={tiny}"), "unknown --encoding 'klingon'")


def wait_for(condition, process, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def assert_interrupted(process):
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()][-1] == "interrupted"
    assert "Traceback" not in stderr


def test_ctrl_c_while_generating_is_one_line_and_status_130(tiny):
    process = start_cli("engine.generate", "--prompt=Once upon a time", "--max_new_tokens=8000",
                        f"--checkpoint={tiny}")
    os.set_blocking(process.stdout.fileno(), False)
    wait_for(lambda: process.stdout.read(1), process)  # it is generating
    assert_interrupted(process)


def test_ctrl_c_while_converting_is_one_line_and_status_130(tmp_path):
    out = tmp_path / "out"
    process = start_cli("engine.convert", f"--output={out}", "--dtype=float32")  # SmolLM2: ~0.5 GB
    wait_for(out.exists, process)  # the model is loaded, its copy being written
    assert_interrupted(process)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's case")
def test_benchmark_on_the_cpu_uses_the_host_memory():
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert device_memory_bytes(None) == host
    assert device_memory_bytes(6) == 6 * 2**30
