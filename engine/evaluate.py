"""Command line: accuracy against compression on synthetic long-context tasks.

    python -m engine.evaluate --tasks=passkey --methods=snapkv,pyramidkv --ratios=0.5,0.75 \\
        --context_length=2400 --num_samples=24 --output_dir=results/passkey

Each batch of contexts is prefilled once; every (method, ratio) then compresses that same prefill,
appends the question and generates greedily, as kvpress's pipeline does. Besides the task score it
measures how far each compressed run's next-token distributions move from the uncompressed run's,
on the uncompressed run's own continuation: mean KL(full || compressed) and top-1 agreement.
Writes results.json, results.md and score_vs_memory.png to --output_dir.
"""

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from checkpoints_convert.load import load_checkpoint
from compression.base import Budget
from compression.compress import context_bytes
from compression.observations import Needs
from compression.registry import NAMES, make_compression, parse
from compression.select import round_up
from engine import cli
from pallas_kernels.errors import UserError
from engine.generation import (Compiler, compress_contexts, decode, feed_questions,
                               empty_kv_state, generated_tokens, pad_prompts,
                               prefill)
from engine.sampling import Sampling
from engine.tasks import TASKS, make_samples, string_match_all
from engine.teacher_forcing import continuation_log_probs, copy_state

_TASKS = flags.DEFINE_list("tasks", ["passkey"], f"Tasks: {', '.join(TASKS)}.")
_METHODS = flags.DEFINE_list("methods", ["snapkv"], "Methods (see engine.generate --compress), "
                             "or 'all'.")
_RATIOS = flags.DEFINE_list("ratios", ["0.5", "0.75", "0.875"], "Compression ratios.")
_BUDGETS = flags.DEFINE_list("kv_budgets", [], "Token budgets (in addition to the ratios).")
_CONTEXT = flags.DEFINE_integer("context_length", 2400, "Context tokens per sample (about).")
_SAMPLES = flags.DEFINE_integer("num_samples", 24, "Samples per task.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the task generators.")
_KL_TOKENS = flags.DEFINE_integer("kl_tokens", 16, "Continuation tokens compared for KL.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model (default: SmolLM2-135M-Instruct).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and KV dtype.")
_OUTPUT = flags.DEFINE_string("output_dir", "results/eval", "Where results are written.")

MAX_NEW_TOKENS = {"passkey": 8, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40,
                  "variable_tracking": 40, "common_words": 80, "frequent_words": 30}
BASELINE = ("none", 0.0)


@dataclasses.dataclass
class Setting:
    name: str  # method spec, or "none"
    budget: Budget | None

    @property
    def label(self) -> tuple[str, float]:
        if self.budget is None:
            return BASELINE
        return (self.name, self.budget.ratio if self.budget.ratio is not None
                else -float(self.budget.tokens))


def evaluate_batch(checkpoint, samples, settings, max_new_tokens, kl_tokens):
    """Scores and distribution shifts of every setting on one batch of samples."""
    params, config, tokenizer = checkpoint.params, checkpoint.config, checkpoint.tokenizer
    contexts = [tokenizer.encode(s.context) for s in samples]
    questions = [tokenizer.encode(s.question) for s in samples]
    lengths = [len(c) for c in contexts]
    padded = pad_prompts(contexts).shape[1]
    after = round_up(max(len(q) for q in questions) + max(max_new_tokens, kl_tokens))
    compressions = {s.label: make_compression(s.name, s.budget) for s in settings
                    if s.budget is not None}
    needs = functools.reduce(Needs.union,
                             [c.compressor.needs() for c in compressions.values()], Needs())
    needs = needs if needs.any() else None
    compiler = Compiler()
    kv_state = empty_kv_state(config, len(samples), padded + after, params.embed.dtype)
    logits, full_state, observations = prefill(compiler, params, config, contexts, kv_state,
                                               needs=needs)

    full_bytes = sum(lengths) * config.kv_bytes_per_token(params.embed.dtype.itemsize)

    def run(state, compression):
        kept = 1.0
        if compression is not None:
            state = compress_contexts(compiler, compression, config, state, observations,
                                      lengths, after)
            kept = context_bytes(state, after) / full_bytes
        forced_state = copy_state(state)
        first, state = feed_questions(compiler, params, config, questions, state, logits)
        out = decode(compiler, params, config, Sampling(), first, state, max_new_tokens, seed=0)
        return generated_tokens(out, config), forced_state, kept

    base_tokens, base_forced, _ = run(copy_state(full_state), None)
    # Compare distributions on the uncompressed run's continuation, up to where it ended.
    compared = np.arange(kl_tokens)[None] < np.array([len(t) for t in base_tokens])[:, None]
    continuations = [(t + [config.eos_token_ids[0]] * kl_tokens)[:kl_tokens] for t in base_tokens]
    reference = continuation_log_probs(params, config, base_forced, questions, continuations)
    per_row = lambda x: (x * compared).sum(axis=1) / compared.sum(axis=1)
    results = {}
    for setting in settings:
        if setting.budget is None:
            tokens, logprobs, kept = base_tokens, reference, 1.0
        else:
            tokens, forced, kept = run(full_state, compressions[setting.label])
            logprobs = continuation_log_probs(params, config, forced, questions, continuations)
        texts = [tokenizer.decode(t) for t in tokens]
        kl = per_row(np.sum(np.exp(reference) * (reference - logprobs), axis=-1))
        agree = per_row(reference.argmax(-1) == logprobs.argmax(-1))
        results[setting.label] = dict(
            scores=[string_match_all(t, s.answers) for t, s in zip(texts, samples)],
            kl=kl.tolist(), top1=agree.tolist(), outputs=texts, kv_kept=[kept])
    return results


def settings_from_flags() -> list[Setting]:
    """The baseline, every eviction method (alone or with a store) at every ratio and budget, a
    store alone once (it evicts nothing), and a store that takes a budget (Quest) per budget."""
    names = [n for n in NAMES if n != "none"] if _METHODS.value == ["all"] else _METHODS.value
    try:
        ratios = [Budget(ratio=float(r)) for r in _RATIOS.value]
        tokens = [Budget(tokens=int(b)) for b in _BUDGETS.value]
    except ValueError as e:
        raise UserError(f"bad --ratios or --kv_budgets: {e}")
    settings = [Setting("none", None)]
    for name in names:
        method, store = parse(name)
        if method is not None:
            chosen = ratios + tokens
        elif store.capabilities.own_budget:
            chosen = tokens
        else:
            chosen = [Budget(ratio=0.0)]
        for budget in chosen:
            make_compression(name, budget)  # fails early on bad names and compositions
            settings.append(Setting(name, budget))
    return settings


def summarise(task_results: dict) -> list[dict]:
    rows = []
    for task, by_setting in task_results.items():
        for (name, ratio), r in by_setting.items():
            rows.append(dict(task=task, method=name,
                             ratio=ratio if ratio >= 0 else None,
                             kv_budget=int(-ratio) if ratio < 0 else None,
                             kv_kept=float(np.mean(r["kv_kept"])),
                             score=float(np.mean(r["scores"])), kl=float(np.mean(r["kl"])),
                             top1=float(np.mean(r["top1"])), samples=len(r["scores"])))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| task | method | ratio | kv_budget | KV kept | score | KL(full‖comp) | top-1 agree "
             "| n |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:g}"
        budget = "" if r["kv_budget"] is None else str(r["kv_budget"])
        lines.append(f"| {r['task']} | {r['method']} | {ratio} | {budget} | "
                     f"{100 * r['kv_kept']:.1f}% | {r['score']:.3f} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['samples']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Score against the context KV memory kept (bytes held over the uncompressed context's),
    one line per method: ratios, budgets and quantized stores on one axis. A run of token
    budgets only is plotted against the budget instead: the tokens each decode step reads, which
    is what Quest (keeping every token) shares with the eviction methods."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(8 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in mine if r["method"] != "none"})
        by_budget = all(r["kv_budget"] is not None for r in mine if r["method"] != "none")
        x = "kv_budget" if by_budget else "kv_kept"
        for i, method in enumerate(methods):
            points = sorted((r[x], r["score"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*points), marker="osD^v<>ph*"[i % 10], color=plt.cm.tab20(i % 20),
                    label=method)
        baseline = [r["score"] for r in mine if r["method"] == "none"]
        if baseline:
            ax.axhline(baseline[0], color="black", linestyle="--", label="uncompressed")
        xlabel = ("context tokens kept or read per decode step" if by_budget
                  else "context KV memory kept (fraction of uncompressed)")
        ax.set(title=task, xlabel=xlabel, ylabel="score", xscale="log", ylim=(-0.05, 1.05))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run() -> None:
    from tqdm import tqdm
    settings = settings_from_flags()
    checkpoint = load_checkpoint(_CHECKPOINT.value, jnp.dtype(_DTYPE.value))
    count = lambda text: len(checkpoint.tokenizer.encode(text))
    task_results = {}
    for task in _TASKS.value:
        samples = make_samples(task, count, _CONTEXT.value, _SAMPLES.value, _SEED.value)
        merged: dict = {}
        batches = range(0, len(samples), _BATCH.value)
        for start in tqdm(batches, desc=task, file=sys.stderr):
            batch = evaluate_batch(checkpoint, samples[start:start + _BATCH.value], settings,
                                   MAX_NEW_TOKENS[task], _KL_TOKENS.value)
            for label, r in batch.items():
                for key, values in r.items():
                    merged.setdefault(label, {}).setdefault(key, []).extend(values)
        task_results[task] = merged
    rows = summarise(task_results)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(os.path.join(_OUTPUT.value, "results.json"), "w") as f:
        json.dump(dict(flags=dict(tasks=_TASKS.value, context_length=_CONTEXT.value,
                                  num_samples=_SAMPLES.value, seed=_SEED.value,
                                  checkpoint=_CHECKPOINT.value or "SmolLM2-135M-Instruct Q4_1",
                                  dtype=_DTYPE.value, backend=jax.default_backend()),
                       rows=rows,
                       outputs={f"{t}/{m}/{r}": v["outputs"] for t, by in task_results.items()
                                for (m, r), v in by.items()}), f, indent=1)
    table = markdown(rows)
    with open(os.path.join(_OUTPUT.value, "results.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(_OUTPUT.value, "score_vs_memory.png"))
    print(table)


if __name__ == "__main__":
    cli.main(run)
