"""Runs the engine's compression path on given queries, keys and values, without a model.

The context is fed chunk by chunk exactly as the prefill does (append to a `DenseKVCache`,
attention, observations), then `compression.compress` builds the compressed state; the result is
read back as the kept positions of each (layer, kv-head) stream, for comparison with NumPy
transcriptions of each paper's algorithm.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compression.compress import Compression, Plan, compress
from compression.observations import LayerObservations, ObservingCache
from models.kv_cache import DenseKVCache, FreshPrefillCache, KVState, PagedKVCache
from models.config import ModelConfig
from models.llama import attend
from models.rope import apply_rope

RECENT_SLOTS = 16  # free slots left after the kept tokens for what follows


def tiny_config(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=num_heads * head_dim, intermediate_size=32,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, max_position_embeddings=4096)


def random_context(config: ModelConfig, batch: int, n: int, seed: int = 0):
    """Per layer: pre-RoPE queries [b, n, heads, d], post-RoPE queries and keys, values; keys
    have a few outlier channels so that scores are not all alike."""
    rng = np.random.default_rng(seed)
    positions = np.broadcast_to(np.arange(n), (batch, n))
    layers = []
    for _ in range(config.num_layers):
        q_pre = rng.normal(size=(batch, n, config.num_heads, config.head_dim)).astype(np.float32)
        k_pre = rng.normal(size=(batch, n, config.num_kv_heads, config.head_dim)).astype(np.float32)
        k_pre[..., :2] *= 3.0
        v = rng.normal(size=(batch, n, config.num_kv_heads, config.head_dim)).astype(np.float32)
        q = np.asarray(apply_rope(jnp.asarray(q_pre), jnp.asarray(positions), config))
        k = np.asarray(apply_rope(jnp.asarray(k_pre), jnp.asarray(positions), config))
        layers.append(dict(q_pre=q_pre, q=q, k=k, v=v))
    return layers


def engine_kept_positions(config: ModelConfig, compression: Compression, layers,
                          lengths: list[int], chunk: int = 16, one_piece: bool = False):
    """Kept positions per layer: a list over layers of [batch][kv_head] -> sorted list of ints.
    `one_piece`: the whole context in one chunk through the fused causal attention and the
    column-sum kernel (or its reference, off GPU), as a fresh prefill runs."""
    batch, n = layers[0]["q"].shape[:2]
    chunk = n if one_piece else chunk
    capacity = -(-n // chunk) * chunk
    needs = compression.compressor.needs()
    states, observations = [], []
    for layer in layers:
        cache = DenseKVCache.empty(batch, config.num_kv_heads, capacity, config.head_dim,
                                   jnp.float32)
        observed = LayerObservations.empty(needs, batch, config.num_heads, config.num_kv_heads,
                                           config.head_dim, capacity)
        for start in range(0, n, chunk):
            positions = np.broadcast_to(np.arange(start, start + chunk), (batch, chunk))
            valid = positions < np.array(lengths)[:, None]
            piece = lambda x: jnp.asarray(np.pad(x[:, start:start + chunk],
                                                 [(0, 0), (0, max(0, start + chunk - n)), (0, 0),
                                                  (0, 0)]))
            cache, observed = _prefill_chunk(
                config, needs, cache, observed, piece(layer["q"]), piece(layer["k"]),
                piece(layer["v"]), jnp.asarray(positions, jnp.int32), jnp.asarray(valid),
                one_piece and start == 0)
        states.append(cache)
        observations.append(observed)
    plan = Plan.make(compression, lengths, config.num_layers, config.num_kv_heads)
    kv_state = KVState(layers=tuple(states), next_positions=jnp.asarray(lengths, jnp.int32))
    compressed = compress(compression.compressor, config, kv_state,
                          tuple(observations) if needs.any() else None,
                          plan.budgets(compression.budget, lengths, RECENT_SLOTS),
                          compression.params)
    return [kept_positions(getattr(layer, "context", layer), config.num_kv_heads)
            for layer in compressed.layers]


@functools.partial(jax.jit, static_argnames=("config", "needs", "fresh"))
def _prefill_chunk(config, needs, cache, observed, q, k, v, positions, valid, fresh):
    """One prefill chunk through the model's own attention step (`models.llama.attend`) on a
    cache watched as the engine's prefill watches it, jitted only to keep the tests fast.
    `fresh`: the whole context at once, as a first prefill runs. The pre-RoPE queries are the
    observer's own (it undoes RoPE on the queries it sees)."""
    if not needs.any():
        _, cache = attend(FreshPrefillCache(cache) if fresh else cache, q, k, v, positions,
                          valid, config)
        return cache, observed
    watched = ObservingCache.watch(cache, observed, needs, config, fresh)
    _, watched = attend(watched, q, k, v, positions, valid, config)
    return watched.cache, watched.observations


def kept_positions(context, kv_heads: int):
    positions, lengths = np.asarray(context.positions), np.asarray(context.lengths)
    if isinstance(context, PagedKVCache):
        table, page = np.asarray(context.page_table), context.page_size
        return [[sorted(positions[b, table[b, h, :-(-lengths[b, h] // page)]].reshape(-1)
                        [:lengths[b, h]].tolist()) for h in range(kv_heads)]
                for b in range(positions.shape[0])]
    return [[sorted(positions[b, h, :lengths[b, h]].tolist()) for h in range(kv_heads)]
            for b in range(positions.shape[0])]
