"""Command line: accuracy against compression on synthetic long-context tasks.

    python -m engine.evaluate --tasks=passkey --methods=snapkv,pyramidkv --ratios=0.5,0.75 \\
        --context_length=2400 --num_samples=24 --output_dir=results/passkey

Each batch of contexts is prefilled once; every (method, ratio) then compresses that same prefill,
appends the question and generates greedily, as kvpress's pipeline does. Besides the task score it
measures how far each compressed run's next-token distributions move from the uncompressed run's,
on the uncompressed run's own continuation: mean KL(full || compressed) and top-1 agreement.
Writes results.json, results.md and score_vs_memory.png to --output_dir.

Nothing finished is lost: each (task, batch, method, ratio) result is appended to results.jsonl in
--output_dir (flushed and fsync'd) as soon as it is computed, beside arguments.json. Run again with
the same arguments, it resumes: finished results are read back (a last line torn by a kill is
dropped and redone) and only the rest runs; the final files come from the accumulated results, so
they equal an uninterrupted run's. Different arguments into the same folder are refused unless
--overwrite, which starts over.
"""

import dataclasses
import functools
import json
import os
import sys
from typing import Iterator

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
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over in an --output_dir that holds "
                               "another run's results (by default a run resumes its own).")

MAX_NEW_TOKENS = {"passkey": 8, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40,
                  "variable_tracking": 40, "common_words": 80, "frequent_words": 30}
BASELINE = ("none", 0.0)
ARGUMENTS = "arguments.json"
RESULTS = "results.jsonl"
FINAL_FILES = ("results.json", "results.md", "score_vs_memory.png")


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


def evaluate_batch(checkpoint, samples, settings, max_new_tokens, kl_tokens,
                   skip=frozenset()) -> Iterator[tuple[tuple[str, float], dict]]:
    """Scores and distribution shifts of every setting on one batch of samples, yielded setting
    by setting as each finishes. Settings whose labels are in `skip` are not run, but still shape
    the prefill (what it observes), so the others' results do not depend on what was skipped."""
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
    for setting in settings:
        if setting.label in skip:
            continue
        if setting.budget is None:
            tokens, logprobs, kept = base_tokens, reference, 1.0
        else:
            tokens, forced, kept = run(full_state, compressions[setting.label])
            logprobs = continuation_log_probs(params, config, forced, questions, continuations)
        texts = [tokenizer.decode(t) for t in tokens]
        kl = per_row(np.sum(np.exp(reference) * (reference - logprobs), axis=-1))
        agree = per_row(reference.argmax(-1) == logprobs.argmax(-1))
        yield setting.label, dict(
            scores=[string_match_all(t, s.answers) for t, s in zip(texts, samples)],
            kl=kl.tolist(), top1=agree.tolist(), outputs=texts, kv_kept=[float(kept)])


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


def arguments() -> dict:
    """The flags a run's results depend on: a resumed run must match them."""
    return dict(tasks=_TASKS.value, methods=_METHODS.value, ratios=_RATIOS.value,
                kv_budgets=_BUDGETS.value, context_length=_CONTEXT.value,
                num_samples=_SAMPLES.value, batch_size=_BATCH.value, seed=_SEED.value,
                kl_tokens=_KL_TOKENS.value, checkpoint=_CHECKPOINT.value, dtype=_DTYPE.value)


def check_output_dir(directory: str, wanted: dict, overwrite: bool) -> None:
    """Refuses a folder that holds anything but this run's own earlier results (unless
    `overwrite`), before any work."""
    if overwrite or not os.path.isdir(directory) or not os.listdir(directory):
        return
    path = os.path.join(directory, ARGUMENTS)
    if not os.path.exists(path):
        raise UserError(f"--output_dir {directory} is not empty and holds no {ARGUMENTS} of an "
                        "earlier run; choose another folder, or pass --overwrite to write there")
    try:
        stored = json.loads(cli.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); pass --overwrite to start over") from None
    if not isinstance(stored, dict):
        raise UserError(f"{path}: not a JSON object; pass --overwrite to start over")
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        k = differ[0]
        raise UserError(f"--output_dir {directory} holds a run with other arguments (--{k} was "
                        f"{stored.get(k)!r}, now {wanted[k]!r}); rerun with its arguments to "
                        "resume it, or pass --overwrite to start over")


def start_output_dir(directory: str, wanted: dict, overwrite: bool) -> None:
    """Creates the folder and its arguments.json; with `overwrite`, first removes what an
    earlier run wrote there."""
    os.makedirs(directory, exist_ok=True)
    if overwrite:
        for name in (ARGUMENTS, RESULTS, *FINAL_FILES):
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
    path = os.path.join(directory, ARGUMENTS)
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(wanted, f, indent=1)
        os.replace(path + ".tmp", path)


def load_results(path: str) -> dict:
    """The finished results in results.jsonl, keyed by (task, batch start, method, ratio).

    Each result is one write of one line ending in a newline, so a kill mid-write leaves at most a
    last line without its newline: it is cut off, to be redone. Any other damage is refused."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            r = json.loads(line)
            done[(r["task"], r["batch"], r["method"], r["ratio"])] = r["result"]
        except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bytes not UTF-8
            raise UserError(f"{path}: line {number} is damaged; pass --overwrite to start "
                            "over") from None
    return done


def append_result(path: str, record: dict) -> None:
    """One line, written whole, flushed and fsync'd before the run moves on."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_context_length(config, tasks, context_length, kl_tokens) -> None:
    window = config.max_position_embeddings
    new = max(max(MAX_NEW_TOKENS.get(t, 0) for t in tasks), kl_tokens)
    if context_length + new >= window:
        raise UserError(f"--context_length={context_length} does not fit the model's "
                        f"{window}-token window with a question and {new} new tokens; use at "
                        f"most about {window - new - 64}")


def check_samples_fit(config, tokenizer, task, samples, kl_tokens) -> None:
    longest = max(len(tokenizer.encode(s.context)) + len(tokenizer.encode(s.question))
                  for s in samples)
    new = max(MAX_NEW_TOKENS[task], kl_tokens)
    if longest + new > config.max_position_embeddings:
        raise UserError(f"{task}: a sample of {longest} tokens plus {new} new ones exceeds the "
                        f"model's {config.max_position_embeddings}-token window; lower "
                        "--context_length")


def run() -> None:
    from tqdm import tqdm
    settings = settings_from_flags()
    wanted, output = arguments(), _OUTPUT.value
    check_output_dir(output, wanted, _OVERWRITE.value)
    checkpoint = load_checkpoint(_CHECKPOINT.value, jnp.dtype(_DTYPE.value))
    check_context_length(checkpoint.config, _TASKS.value, _CONTEXT.value, _KL_TOKENS.value)
    count = lambda text: len(checkpoint.tokenizer.encode(text))
    samples = {task: make_samples(task, count, _CONTEXT.value, _SAMPLES.value, _SEED.value)
               for task in _TASKS.value}
    for task, task_samples in samples.items():
        check_samples_fit(checkpoint.config, checkpoint.tokenizer, task, task_samples,
                          _KL_TOKENS.value)
    start_output_dir(output, wanted, _OVERWRITE.value)
    results_path = os.path.join(output, RESULTS)
    done = load_results(results_path)
    for task, task_samples in samples.items():
        starts = range(0, len(task_samples), _BATCH.value)
        with tqdm(total=len(task_samples) * len(settings), unit="sample", file=sys.stderr,
                  desc=f"{task} ({len(settings)} settings)") as bar:
            for start in starts:
                batch = task_samples[start:start + _BATCH.value]
                skip = {s.label for s in settings if (task, start, *s.label) in done}
                bar.update(len(batch) * len(skip))
                if len(skip) == len(settings):
                    continue
                for label, result in evaluate_batch(checkpoint, batch, settings,
                                                    MAX_NEW_TOKENS[task], _KL_TOKENS.value, skip):
                    append_result(results_path, dict(task=task, batch=start, method=label[0],
                                                     ratio=label[1], result=result))
                    done[(task, start, *label)] = result
                    bar.update(len(batch))
    task_results = {task: {s.label: merge(done[(task, start, *s.label)]
                                          for start in range(0, len(task_samples), _BATCH.value))
                           for s in settings}
                    for task, task_samples in samples.items()}
    write_final(output, task_results)


def merge(batches) -> dict:
    merged: dict = {}
    for result in batches:
        for key, values in result.items():
            merged.setdefault(key, []).extend(values)
    return merged


def write_final(output: str, task_results: dict) -> None:
    rows = summarise(task_results)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(dict(flags=dict(tasks=_TASKS.value, context_length=_CONTEXT.value,
                                  num_samples=_SAMPLES.value, seed=_SEED.value,
                                  checkpoint=_CHECKPOINT.value or "SmolLM2-135M-Instruct Q4_1",
                                  dtype=_DTYPE.value, backend=jax.default_backend()),
                       rows=rows,
                       outputs={f"{t}/{m}/{r}": v["outputs"] for t, by in task_results.items()
                                for (m, r), v in by.items()}), f, indent=1)
    table = markdown(rows)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(output, "score_vs_memory.png"))
    print(table)


if __name__ == "__main__":
    cli.main(run)
