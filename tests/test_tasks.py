"""The synthetic tasks: deterministic for a seed, sized as asked, answerable from their context,
and scored as RULER scores (the fraction of reference strings found in the output)."""

import collections
import json
import re
import subprocess
import sys

import pytest

from engine.tasks import TASKS, make_samples, string_match_all

count_words = lambda text: len(text.split())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_samples_other_seed_other_samples(task):
    first = make_samples(task, count_words, 400, 3, seed=1)
    assert first == make_samples(task, count_words, 400, 3, seed=1)
    assert first != make_samples(task, count_words, 400, 3, seed=2)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_contexts_have_about_the_asked_length_and_hold_the_answers(task):
    for sample in make_samples(task, count_words, 1000, 4, seed=0):
        assert 700 <= count_words(sample.context) <= 1400
        if task in ("common_words", "frequent_words"):
            counts = collections.Counter(re.findall(r"\d+\. (\w+)", sample.context))
            ranked = [w for w, _ in counts.most_common(len(sample.answers))]
            assert sorted(ranked) == sorted(sample.answers)
        else:
            assert all(answer in sample.context for answer in sample.answers)


def test_scores_follow_ruler_string_match_all():
    assert string_match_all(" 12345. Remember", ("12345",)) == 1.0
    assert string_match_all(" 54321.", ("12345",)) == 0.0
    assert string_match_all("11111, 22222 and 99999", ("11111", "22222", "33333", "44444")) == 0.5
    assert string_match_all("APPLE river", ("apple", "river")) == 1.0


def test_evaluate_cli_writes_table_json_and_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "engine.evaluate", "--tasks=passkey", "--methods=knorm",
         "--ratios=0.5", "--context_length=150", "--num_samples=2", "--batch_size=2",
         "--kl_tokens=4", f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    baseline = next(r for r in rows if r["method"] == "none")
    assert baseline["kl"] == pytest.approx(0.0, abs=1e-6) and baseline["top1"] == 1.0
    assert {r["method"] for r in rows} == {"none", "knorm"}
    knorm = next(r for r in rows if r["method"] == "knorm")
    assert baseline["kv_kept"] == 1.0 and 0.45 <= knorm["kv_kept"] <= 0.7  # half, slots rounded
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert (tmp_path / "score_vs_memory.png").stat().st_size > 0
    assert "| passkey | knorm | 0.5 |" in (tmp_path / "results.md").read_text()
