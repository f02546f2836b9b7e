"""Decode-time eviction keeps every stream within its budget for generations of any length, and
evicts what a NumPy transcription of each paper's per-step rule evicts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.base import Budget
from compression.compress import Compression
from compression.decode_eviction import DecodeEviction, EvictingKVCache
from compression.h2o import H2O
from compression.streamingllm import StreamingLLM
from compression.tova import TOVA
from engine.generation import generate
from models.kv_cache import DenseKVCache
from tests.hf_reference import converted, tiny_hf_model

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_streamingllm_2000_tokens_stay_at_budget_in_one_compiled_program():
    config, params = converted(tiny_hf_model("llama"))
    config = dataclasses.replace(config, max_position_embeddings=4096)
    budget, prompt, new = 64, list(range(3, 103)), 2000
    compiles, at_token = [], []
    listener = lambda e, *a, **k: compiles.append(e) if e == BACKEND_COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = generate(params, config, [prompt], new,
                          compression=Compression(DecodeEviction(StreamingLLM()), Budget(tokens=budget)),
                          on_token=lambda t: at_token.append(len(compiles)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(result.tokens[0]) == new and at_token[-1] == at_token[0]
    fed = len(prompt) + new - 1  # the last sampled token is never fed back
    expected = list(range(4)) + list(range(fed - (budget - 4), fed))
    for layer in result.kv_state.layers:
        assert np.all(np.asarray(layer.cache.lengths) == budget)
        for positions in np.asarray(layer.cache.positions)[0]:
            assert sorted(positions[:budget].tolist()) == expected


def numpy_decode_eviction(rule, q, k, budget, n_sink=4):
    """Feeds one token at a time: append, attend with the current query (heads [h, g]), evict
    one token per stream once over budget. Returns kept positions per kv-head."""
    steps, kv_heads, group, d = q.shape
    kept = [[] for _ in range(kv_heads)]
    sums = [dict() for _ in range(kv_heads)]
    for t in range(steps):
        for h in range(kv_heads):
            kept[h].append(t)
            sums[h][t] = 0.0
        probs = []
        for h in range(kv_heads):
            logits = np.array([[q[t, h, g] @ k[j, h] / np.sqrt(d) for j in kept[h]]
                               for g in range(group)])
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            probs.append(p)
            for i, j in enumerate(kept[h]):
                sums[h][j] += p[:, i].sum()
        for h in range(kv_heads):
            if len(kept[h]) <= budget:
                continue
            if rule == "streamingllm":
                score = [np.inf if j < n_sink else j for j in kept[h]]
            elif rule == "tova":  # all heads of the layer averaged; kept lists are identical
                score = list(np.mean([p.mean(0) for p in probs], axis=0))
            else:  # h2o: recent half protected, others by normalised accumulated attention
                score = [np.inf if j > t - budget // 2 else sums[h][j] / (t - j + 1)
                         for j in kept[h]]
            kept[h].pop(int(np.argmin(score)))
    return kept


@pytest.mark.parametrize("rule,method", [("streamingllm", StreamingLLM()), ("tova", TOVA()),
                                         ("h2o", H2O())])
def test_per_step_eviction_matches_numpy(rule, method):
    rng = np.random.default_rng(3)
    steps, kv_heads, group, d, budget = 48, 2, 3, 8, 12
    q = rng.normal(size=(steps, kv_heads, group, d)).astype(np.float32) * 2
    k = rng.normal(size=(steps, kv_heads, d)).astype(np.float32)
    cache = EvictingKVCache(DenseKVCache.empty(1, kv_heads, 16, d, jnp.float32),
                            jnp.zeros((1, kv_heads, 16)), method, budget)

    @jax.jit
    def step(cache, q_t, k_t, t):
        position = jnp.full((1, 1), t, jnp.int32)
        cache = cache.append(k_t[None, None], k_t[None, None], position, jnp.ones((1, 1), bool))
        _, cache = cache.attend(q_t.reshape(1, 1, kv_heads * group, d), position)
        return cache

    for t in range(steps):
        cache = step(cache, jnp.asarray(q[t]), jnp.asarray(k[t]), t)
    expected = numpy_decode_eviction(rule, q, k, budget)
    lengths = np.asarray(cache.cache.lengths)[0]
    positions = np.asarray(cache.cache.positions)[0]
    for h in range(kv_heads):
        assert lengths[h] == budget
        assert sorted(positions[h, :budget].tolist()) == expected[h]
