"""The generation loop: incremental decoding equals one full pass, batching equals one prompt at a
time, sampling filters match a NumPy transcription, and decoding compiles once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.base import Budget
from compression.compress import Compression
from compression.snapkv import SnapKV
from engine.generation import extend, generate
from models.kv_cache import KVState
from engine.sampling import Sampling, sample
from models import llama
from tests.hf_reference import converted, tiny_hf_model

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request):
    return converted(tiny_hf_model(request.param))


def test_prefill_then_decode_equals_one_full_pass(tiny):
    config, params = tiny
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 20))
    state = KVState.empty(config, 2, 24, jnp.float32)
    hidden, _ = llama.forward(params, config, jnp.asarray(tokens), jnp.ones((2, 20), bool), state)
    full = np.asarray(llama.logits(params, hidden))

    state = KVState.empty(config, 2, 24, jnp.float32)
    for start in (0, 6):  # two prefill chunks of 6 tokens
        chunk = jnp.asarray(tokens[:, start:start + 6])
        logits, state = extend(params, config, chunk, jnp.ones((2, 6), bool), state)
    np.testing.assert_allclose(logits, full[:, 11], atol=1e-5 * np.abs(full).max())
    for t in range(12, 20):
        hidden, state = llama.forward(params, config, jnp.asarray(tokens[:, t:t + 1]),
                                      jnp.ones((2, 1), bool), state)
        np.testing.assert_allclose(llama.logits(params, hidden)[:, 0], full[:, t],
                                   atol=1e-5 * np.abs(full).max())
    assert state.next_positions.tolist() == [20, 20]


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny):
    config, params = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (3, 70, 12, 29)]
    batched = generate(params, config, prompts, 24).tokens
    alone = [generate(params, config, [p], 24).tokens[0] for p in prompts]
    assert batched == alone


def test_rows_stop_at_their_own_eos(tiny):
    config, params = tiny
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = generate(params, config, prompts, 12).tokens
    eos = free[0][3]  # row 0 must stop at this token's first occurrence
    config = dataclasses.replace(config, eos_token_ids=(eos,))
    stopped = generate(params, config, prompts, 12).tokens
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) <= 4


def test_decoding_200_tokens_compiles_nothing_after_the_first_token(tiny):
    config, params = tiny
    compiles, seen_at_token = [], []
    listener = lambda event, *a, **k: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = generate(params, config, [[3, 4, 5]], 200, on_token=lambda t: seen_at_token.append(
            len(compiles)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(result.tokens[0]) == 200 and len(seen_at_token) == 200
    assert seen_at_token[-1] == seen_at_token[0]


def test_streamed_tokens_equal_the_compiled_loop(tiny):
    config, params = tiny
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    streamed = []
    generate(params, config, [[3, 4, 5, 6]], 30, sampling, seed=7, on_token=streamed.append)
    assert streamed == generate(params, config, [[3, 4, 5, 6]], 30, sampling, seed=7).tokens[0]


def numpy_filtered_support(logits, temperature, top_k, top_p):
    """Token ids that HF's temperature -> top-k -> top-p warpers leave samplable."""
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(len(scaled), bool)
    keep[order[:top_k or len(scaled)]] = True
    probs = np.exp(scaled[order] - scaled[order].max()) * keep[order]
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    nucleus = order[(mass_before < top_p) & keep[order]]
    return set(nucleus.tolist())


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (8, 0.7), (0, 1.0)])
def test_sampling_draws_only_from_the_filtered_support(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(1, 50)).astype(np.float32) * 2
    support = numpy_filtered_support(logits[0], 0.7, top_k, top_p)
    draws = jax.vmap(lambda k: sample(jnp.asarray(logits), k, Sampling(0.7, top_k, top_p)))(
        jax.random.split(jax.random.key(0), 2000))
    drawn = set(np.asarray(draws).ravel().tolist())
    assert drawn <= support
    assert len(drawn) >= min(len(support), 3)


def test_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40)), jnp.float32)
    assert sample(logits, jax.random.key(0), Sampling()).tolist() == np.argmax(logits, 1).tolist()


def test_prefilling_in_groups_generates_what_one_batch_does(tiny):
    config, params = tiny
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (40, 9, 33, 21, 50)]
    compression = Compression(SnapKV(window_size=4), Budget(ratio=0.5))
    whole = generate(params, config, prompts, 10, compression=compression)
    grouped = generate(params, config, prompts, 10, compression=compression, prefill_batch=2)
    assert grouped.tokens == whole.tokens
    assert grouped.kv_bytes == whole.kv_bytes
