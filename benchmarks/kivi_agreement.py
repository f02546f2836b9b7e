"""Greedy agreement of the quantized KV stores with the uncompressed cache, on SmolLM2.

    python -m benchmarks.kivi_agreement [--stores=kivi4,kivi2,int8] [--num_prompts=20]

Seeded passkey prompts (`engine.tasks`, contexts of about --context_length tokens, the question
appended after compression) run greedily for --new_tokens tokens, uncompressed and with every
store (each store alone: all tokens kept, quantized). For every prompt and store it prints the
first generated position where the tokens depart from the uncompressed run's, or "matches", and
at a departure the uncompressed run's top-1 minus top-2 log-probability there (a small margin: a
near-tie that a small perturbation flips); then the texts of the runs that depart. Last, per
store: prompts that match, passkeys found, and the mean KL(uncompressed || store) of the
next-token distributions over the uncompressed continuation (teacher-forced).
"""


import jax
import numpy as np
from absl import flags

from checkpoints_convert.load import load_checkpoint
from compression.registry import make_compression
from compression.select import round_up
from engine import cli
from engine.generation import (Compiler, compress_contexts, decode, feed_questions,
                               generated_tokens, pad_prompts, prefill)
from models.kv_cache import KVState
from engine.sampling import Sampling
from engine.tasks import make_samples, string_match_all
from engine.teacher_forcing import continuation_log_probs, copy_state

_STORES = flags.DEFINE_list("stores", ["kivi4", "kivi2", "int8"], "Quantized stores compared.")
_PROMPTS = flags.DEFINE_integer("num_prompts", 20, "Seeded passkey prompts.")
_CONTEXT = flags.DEFINE_integer("context_length", 1100, "Context tokens per prompt (about).")
_NEW = flags.DEFINE_integer("new_tokens", 16, "Greedy tokens generated per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 10, "Prompts per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model (default: SmolLM2-135M-Instruct).")


def run_batch(checkpoint, contexts, questions, specs):
    """Greedy tokens and teacher-forced log-probs on the uncompressed continuation, per spec
    ("none" first): {spec: (tokens per prompt, log-probs [batch, new_tokens, vocab])}."""
    params, config = checkpoint.params, checkpoint.config
    lengths = [len(c) for c in contexts]
    after = round_up(max(len(q) for q in questions) + _NEW.value)
    compiler = Compiler()
    state = KVState.empty(config, len(contexts), pad_prompts(contexts).shape[1] + after,
                          params.embed.dtype)
    logits, full_state, _ = prefill(compiler, params, config, contexts, state)
    results, continuations = {}, None
    for spec in specs:
        state = copy_state(full_state)
        compression = make_compression(spec, None)
        if compression is not None:
            state = compress_contexts(compiler, compression, config, state, None, lengths, after)
        forced_state = copy_state(state)
        first, state = feed_questions(compiler, params, config, questions, state, logits)
        tokens = generated_tokens(decode(compiler, params, config, Sampling(), first, state,
                                         _NEW.value, seed=0), config)
        if continuations is None:  # the uncompressed run's, padded with EOS where it ended
            continuations = [(t + [config.eos_token_ids[0]] * _NEW.value)[:_NEW.value]
                             for t in tokens]
        results[spec] = (tokens, continuation_log_probs(params, config, forced_state, questions,
                                                        continuations))
    return results


def departure(tokens, reference) -> int | None:
    """First position where two greedy runs differ (a run that ended early differs at its
    end), None if they agree throughout."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def run() -> None:
    specs = ["none", *_STORES.value]
    for spec in _STORES.value:
        make_compression(spec, None)  # unknown names fail before the model loads
    checkpoint = load_checkpoint(_CHECKPOINT.value)
    tokenizer = checkpoint.tokenizer
    samples = make_samples("passkey", lambda text: len(tokenizer.encode(text)), _CONTEXT.value,
                           _PROMPTS.value, _SEED.value)
    contexts = [tokenizer.encode(s.context) for s in samples]
    questions = [tokenizer.encode(s.question) for s in samples]
    merged = {spec: ([], []) for spec in specs}
    for start in range(0, len(samples), _BATCH.value):
        part = slice(start, start + _BATCH.value)
        for spec, (tokens, log_probs) in run_batch(checkpoint, contexts[part], questions[part],
                                                   specs).items():
            merged[spec][0].extend(tokens)
            merged[spec][1].extend(log_probs)
    base_tokens, base_lp = merged["none"]
    found = {spec: [string_match_all(tokenizer.decode(t), s.answers) == 1
                    for t, s in zip(merged[spec][0], samples)] for spec in specs}
    print(f"backend {jax.default_backend()} | {len(samples)} passkey prompts of "
          f"{min(map(len, contexts))}-{max(map(len, contexts))} context tokens | greedy "
          f"{_NEW.value} tokens | first departure from the uncompressed run "
          "(top-1 minus top-2 log-prob of the uncompressed run there)")
    print("| prompt | context | passkey (none) | " + " | ".join(_STORES.value) + " |")
    print("|---" * (3 + len(_STORES.value)) + "|")
    for i in range(len(samples)):
        cells = []
        for spec in _STORES.value:
            at = departure(merged[spec][0][i], base_tokens[i])
            if at is None:
                cells.append("matches")
                continue
            second, first = np.sort(base_lp[i][min(at, _NEW.value - 1)])[-2:]
            cells.append(f"departs at {at} (margin {first - second:.2f})")
        print(f"| {i} | {len(contexts[i])} | {'found' if found['none'][i] else 'missed'} | "
              + " | ".join(cells) + " |")
    print("\nContinuations where a store departs (uncompressed first):")
    for i in range(len(samples)):
        departing = [spec for spec in _STORES.value
                     if departure(merged[spec][0][i], base_tokens[i]) is not None]
        if departing:
            print(f"{i} passkey {samples[i].answers[0]}: none {tokenizer.decode(base_tokens[i])!r}"
                  + "".join(f" | {spec} {tokenizer.decode(merged[spec][0][i])!r}"
                            for spec in departing))
    for spec in _STORES.value:
        tokens, lp = merged[spec]
        same = sum(departure(t, b) is None for t, b in zip(tokens, base_tokens))
        kl = np.mean([np.sum(np.exp(b) * (b - s), axis=-1)[:len(t)].mean()
                      for b, s, t in zip(base_lp, lp, base_tokens)])
        print(f"{spec}: {same}/{len(samples)} prompts match, passkey found "
              f"{sum(found[spec])}/{len(samples)} (uncompressed {sum(found['none'])}), "
              f"mean KL(none || {spec}) {kl:.2e} nats/token")


if __name__ == "__main__":
    cli.main(run)
