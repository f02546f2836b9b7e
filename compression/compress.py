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

from compression.base import Budget, Method, Store
from compression.decode_eviction import DecodeEviction, EvictingKVCache
from compression.select import capacity_for, keep_per_head, keep_per_layer
from pallas_kernels.errors import UserError
from models.kv_cache import DenseKVCache, KVState, SegmentedCache
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Compression:
    """An eviction method, its budget and optionally a store for what is kept (`snapkv+kivi2`).
    With `decode_eviction` the budget holds for the whole cache during generation (the prompt is
    compressed to it, then each step evicts one token)."""

    method: Method
    budget: Budget
    decode_eviction: bool = False
    store: Store | None = None

    def __post_init__(self):
        if self.store is not None:
            self.store.check_compatible(self.method)
            if self.decode_eviction:
                raise UserError("decode-time eviction does not compose with a store")
        if self.decode_eviction:
            if not hasattr(self.method, "decode_scores"):
                raise UserError(f"{type(self.method).__name__} has no decode-time eviction; "
                                "use streamingllm, h2o or tova")
            if self.budget.tokens is None:
                raise UserError("decode-time eviction needs --kv_budget (tokens kept)")


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
        capacities = tuple(capacity_for(int(streams * row.max())) for row in n_kept)
        if compression.decode_eviction:  # one spare slot takes each new token before eviction
            capacities = (capacity_for(compression.budget.tokens + 1),) * num_layers
        return cls(n_kept, floors, capacities)

    def rows(self, rows: slice) -> "Plan":
        """The plan of some of the batch's rows, with the whole batch's capacities."""
        return Plan(self.n_kept[:, rows], self.floors[:, rows], self.capacities)


@functools.partial(jax.jit, static_argnames=("compression", "config", "capacities",
                                             "recent_capacity"))
def compress(compression: Compression, config: ModelConfig, kv_state: KVState, observations,
             context_lengths, n_kept, floors, capacities: tuple[int, ...],
             recent_capacity: int) -> KVState:
    """Returns the KV state with every layer a `DenseKVCache` holding the kept tokens and
    `recent_capacity` free slots (uniform budgets), a `SegmentedCache` (compressed context +
    recent: head-wise budgets, stores) or an `EvictingKVCache` with decode-time eviction."""
    method = compression.method
    # Uniform budgets without a store: the kept tokens and the tokens to come share one cache,
    # so a decode step runs one attention per layer instead of two and a merge.
    joined = not (method.head_wise or compression.store is not None
                  or compression.decode_eviction)
    layers = []
    for i, cache in enumerate(kv_state.layers):
        observed = None if observations is None else observations[i]
        scores = method.score(observed, cache, context_lengths, config)
        if method.head_wise:
            context = keep_per_layer(cache, scores, n_kept[i], floors[i], capacities[i])
        elif joined:
            layers.append(keep_per_head(cache, scores, n_kept[i],
                                        capacity_for(capacities[i] + recent_capacity)))
            continue
        else:
            context = keep_per_head(cache, scores, n_kept[i], capacities[i])
        if compression.decode_eviction:
            layers.append(EvictingKVCache(context, _kept_attention_sums(observed, context),
                                          DecodeEviction(method, compression.budget.tokens)))
            continue
        batch, kv_heads, _, head_dim = cache.keys.shape
        recent = DenseKVCache.empty(batch, kv_heads, recent_capacity, head_dim, cache.keys.dtype)
        layer = SegmentedCache(context, recent)
        if compression.store is not None:
            layer = compression.store.convert_layer(i, layer, config, compression.budget)
        layers.append(layer)
    return KVState(layers=tuple(layers), next_positions=kv_state.next_positions)


def _kept_attention_sums(observed, context: DenseKVCache):
    """The prefill's attention sums of the kept tokens (H2O), zeros for other methods. During
    the prefill slot == position, so the kept positions index the sums."""
    if observed is None or observed.column_sums is None:
        return jnp.zeros(context.positions.shape, jnp.float32)
    slots = jnp.maximum(context.positions, 0)
    return jnp.take_along_axis(observed.column_sums, slots, axis=2)


def context_bytes(kv_state: KVState, reserved: int) -> int:
    """Bytes of the compressed context (what compression saves on): a segmented layer's context
    segment; a cache shared with the tokens to come, less its `reserved` slots for them."""
    total = 0
    for layer in kv_state.layers:
        if isinstance(layer, DenseKVCache):
            total += layer.nbytes() * (layer.capacity - reserved) // layer.capacity
        else:
            total += getattr(layer, "context", layer).nbytes()
    return total
