"""`python -m engine.evaluate` loses nothing finished: interrupted (Ctrl-C) or killed mid-run and
run again with the same arguments, it resumes and ends with the results of an uninterrupted run;
it refuses other arguments into a used folder (unless --overwrite) and a context longer than the
model's window before any work; its progress bar moves per sample."""

import json
import re
import signal
import time

import pytest

from tests.tiny_checkpoint import assert_one_line, run_cli, start_cli, write_tiny_checkpoint

# 8 samples in 4 batches, 3 settings (baseline, snapkv at two ratios): 12 results.
FLAGS = ["--tasks=passkey", "--methods=snapkv", "--ratios=0.5,0.75", "--context_length=160",
         "--num_samples=8", "--batch_size=2", "--kl_tokens=4"]
RESULTS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "whole"
    result = run_cli("engine.evaluate", *FLAGS, f"--checkpoint={checkpoint}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def finished_lines(out) -> int:
    path = out / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def stop_after(process, out, lines: int, sig) -> None:
    """Sends `sig` once `lines` results are on disk (the run is then mid-way)."""
    deadline = time.time() + 240
    while finished_lines(out) < lines:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(sig)


def test_interrupted_and_killed_runs_resume_to_the_uninterrupted_results(checkpoint, uninterrupted,
                                                                          tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "resumed"
    args = [*FLAGS, f"--checkpoint={checkpoint}", f"--output_dir={out}"]

    first = start_cli("engine.evaluate", *args)
    stop_after(first, out, 4, signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    kept = finished_lines(out)
    assert 4 <= kept < RESULTS

    second = start_cli("engine.evaluate", *args)
    stop_after(second, out, kept + 3, signal.SIGKILL)
    second.communicate(timeout=120)
    assert second.returncode == -signal.SIGKILL
    killed_at = finished_lines(out)
    assert kept + 3 <= killed_at < RESULTS
    with open(out / "results.jsonl", "ab") as f:  # a kill in the middle of writing a result
        f.write(b'{"task": "passkey", "batch": 6, "method": "snapk')

    third = run_cli("engine.evaluate", *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert finished_lines(out) == RESULTS  # the torn line was dropped and redone, once
    assert json.loads((out / "results.json").read_text()) == \
        json.loads((whole / "results.json").read_text())
    assert (out / "results.md").read_text() == (whole / "results.md").read_text()


def test_progress_bar_advances_per_sample(uninterrupted):
    _, result = uninterrupted
    positions = set(re.findall(r"(\d+)/24 ", result.stderr))  # 8 samples x 3 settings
    assert len(positions) > 4 + 1  # more than once per batch (4 batches) plus the start


def test_a_finished_run_rerun_resumes_without_work_and_other_arguments_are_refused(
        checkpoint, uninterrupted):
    whole, _ = uninterrupted
    before = (whole / "results.jsonl").read_bytes()
    again = run_cli("engine.evaluate", *FLAGS, f"--checkpoint={checkpoint}", f"--output_dir={whole}")
    assert again.returncode == 0 and (whole / "results.jsonl").read_bytes() == before

    other = run_cli("engine.evaluate", *FLAGS, "--seed=1", f"--checkpoint={checkpoint}",
                    f"--output_dir={whole}")
    assert other.returncode == 1
    assert_one_line(other, "error: ", "other arguments", "--seed", "--overwrite")
    assert (whole / "results.jsonl").read_bytes() == before


def test_overwrite_starts_over(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("not ours\n")
    refused = run_cli("engine.evaluate", *FLAGS, f"--checkpoint={checkpoint}", f"--output_dir={out}")
    assert refused.returncode == 1
    assert_one_line(refused, "error: ", "arguments.json", "--overwrite")
    small = ["--num_samples=2", "--ratios=0.5", "--kl_tokens=4", "--context_length=160"]
    done = run_cli("engine.evaluate", *small, "--overwrite", f"--checkpoint={checkpoint}",
                   f"--output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished_lines(out) == 2 and b"not ours" not in (out / "results.jsonl").read_bytes()


def test_context_longer_than_the_window_is_refused_before_any_work(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli("engine.evaluate", "--context_length=9000", f"--checkpoint={checkpoint}",
                     f"--output_dir={out}")
    assert result.returncode == 1
    assert_one_line(result, "error: --context_length=9000", "8192-token window")
    assert not out.exists()
