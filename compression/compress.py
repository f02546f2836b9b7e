"""Compressing a prefilled context: score every cached token with the method, keep each stream's
budget, and rebuild each layer as a smaller context segment plus an empty exact segment for what
comes after (the question and the generated tokens).

Budgets are worked out on the host from the true context lengths (padding never counts); the
arrays are sized to the largest budget in the batch, rounded up to `select.BLOCK` slots.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compression.base import Budget, Method
from compression.select import keep_per_head, keep_per_layer, round_up
from engine.kv_state import DenseKVCache, KVState, SegmentedCache
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Compression:
    method: Method
    budget: Budget


@dataclasses.dataclass(frozen=True)
class Plan:
    n_kept: np.ndarray  # [layers, batch] tokens kept per (layer, kv-head) stream
    floors: np.ndarray  # [layers, batch] head-wise methods: tokens each head keeps at least
    capacities: tuple[int, ...]  # slots of each layer's context segment

    @classmethod
    def make(cls, compression: Compression, context_lengths: list[int], num_layers: int,
             kv_heads: int) -> "Plan":
        method = compression.method
        n_kept = np.array([method.layer_budgets(compression.budget, n, num_layers)
                           for n in context_lengths], np.int32).T
        n_kept = np.minimum(n_kept, np.array(context_lengths, np.int32)[None, :])
        floors = np.zeros_like(n_kept)
        streams = 1
        if method.head_wise:
            floors = np.vectorize(method.safeguard)(n_kept).astype(np.int32)
            streams = kv_heads
        capacities = tuple(round_up(int(streams * row.max())) for row in n_kept)
        return cls(n_kept, floors, capacities)


@functools.partial(jax.jit, static_argnames=("method", "config", "capacities", "recent_capacity"),
                   donate_argnames=("kv_state",))
def compress(method: Method, config: ModelConfig, kv_state: KVState, observations,
             context_lengths, n_kept, floors, capacities: tuple[int, ...],
             recent_capacity: int) -> KVState:
    """Returns the KV state with every layer a `SegmentedCache` (compressed context + recent)."""
    layers = []
    for i, cache in enumerate(kv_state.layers):
        scores = method.score(None if observations is None else observations[i], cache,
                              context_lengths, config)
        if method.head_wise:
            context = keep_per_layer(cache, scores, n_kept[i], floors[i], capacities[i])
        else:
            context = keep_per_head(cache, scores, n_kept[i], capacities[i])
        batch, kv_heads, _, head_dim = cache.keys.shape
        recent = DenseKVCache.empty(batch, kv_heads, recent_capacity, head_dim, cache.keys.dtype)
        layers.append(SegmentedCache(context, recent))
    return KVState(layers=tuple(layers), next_positions=kv_state.next_positions)


def context_bytes(kv_state: KVState) -> int:
    """Bytes of the compressed context segments (what compression saves on)."""
    return sum(layer.context.nbytes() for layer in kv_state.layers)
