"""Decode-time eviction: each (sequence, kv-head) stream holds at most `budget` tokens however
long the generation runs (StreamingLLM, H2O and TOVA as their papers run them).

The prompt is prefilled and compressed to the budget with the method's prefill rule; from then on
every decode step appends its token into one spare slot, attends, and, where a stream is over its
budget, moves that newest token into the slot of the token the method evicts. The cache keeps the
same arrays (budget + 1 slots, rounded up to a block) for the whole generation: one compiled step.
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.base import Method
from models.kv_cache import DenseKVCache, group_queries


@dataclasses.dataclass(frozen=True)
class DecodeEviction:
    method: Method  # has decode_scores(cache, probs, attention_sums, query_positions, budget)
    budget: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingKVCache:
    cache: DenseKVCache
    attention_sums: jax.Array  # [batch, kv_heads, slots] float32, attention each slot received
    policy: DecodeEviction = dataclasses.field(metadata=dict(static=True))

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.attention_sums.size * 4

    def append(self, keys, values, positions, valid) -> "EvictingKVCache":
        free = jnp.arange(self.cache.capacity) >= self.cache.lengths[..., None]
        return EvictingKVCache(self.cache.append(keys, values, positions, valid),
                               jnp.where(free, 0.0, self.attention_sums), self.policy)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        cache = self.cache
        out, _, probs = cache.partial(group_queries(queries, cache.keys.shape[1]), query_positions,
                                      sliding_window)
        sums = self.attention_sums + probs.sum(axis=(2, 3))
        scores = self.policy.method.decode_scores(cache, probs, sums, query_positions,
                                                  self.policy.budget)
        cache, sums = _evict_over_budget(cache, sums, scores, self.policy.budget)
        return (out.reshape(queries.shape).astype(queries.dtype),
                EvictingKVCache(cache, sums, self.policy))


def _evict_over_budget(cache: DenseKVCache, sums, scores, budget: int):
    """Where a stream holds budget + 1 tokens, its lowest-scored token makes way for the newest
    (the newest itself may be the one evicted). Writes one slot per stream."""
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)
    valid = slot < cache.lengths[..., None]
    victim = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1).astype(jnp.int32)  # [b, h]
    over = cache.lengths > budget
    target = jnp.where(over, victim, cache.capacity)[..., None]  # out of range: no write
    newest = jnp.maximum(cache.lengths - 1, 0)[..., None]
    batch, heads = cache.lengths.shape
    b = jnp.arange(batch)[:, None, None]
    h = jnp.arange(heads)[None, :, None]
    move = lambda x: x.at[b, h, target].set(x[b, h, newest], mode="drop")
    return DenseKVCache(keys=move(cache.keys), values=move(cache.values),
                        positions=move(cache.positions),
                        lengths=jnp.where(over, budget, cache.lengths)), move(sums)
