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

from compression.base import Budget, Capabilities, Compressor, Scorer
from compression.observations import Needs
from compression.select import keep_per_head
from models.kv_cache import KVState, DenseKVCache, group_queries
from pallas_kernels.errors import UserError


@dataclasses.dataclass(frozen=True)
class DecodeEviction(Compressor):
    """A scorer that can score at decode time (`capabilities.decode_scoring`: its
    `decode_scores(cache, probs, attention_sums, query_positions, budget)`) run as its paper
    runs it: the prompt compressed to `--kv_budget` tokens per stream, then one eviction per
    step."""

    method: Scorer

    def __post_init__(self):
        if not self.method.capabilities.decode_scoring:
            raise UserError(f"{type(self.method).__name__} has no decode-time eviction; "
                            "use streamingllm, h2o or tova")

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.method.capabilities, decode_step=True)

    def needs(self) -> Needs:
        return self.method.needs()

    def check_budget(self, budget: Budget) -> None:
        if budget.tokens is None:
            raise UserError("decode-time eviction needs --kv_budget (tokens kept)")

    def layer_budgets(self, budget, n, num_layers):
        return self.method.layer_budgets(budget, n, num_layers)

    def compress(self, state, observations, budgets, params, config):
        layers = []
        for i, cache in enumerate(state.layers):
            observed = None if observations is None else observations[i]
            scores = self.method.score(observed, cache, budgets.context_lengths, config)
            context = keep_per_head(cache, scores, budgets.n_kept[i], budgets.capacities[i])
            layers.append(EvictingKVCache(context, _kept_attention_sums(observed, context),
                                          self.method, budgets.budget.tokens))
        return KVState(layers=tuple(layers), next_positions=state.next_positions)


def _kept_attention_sums(observed, context: DenseKVCache):
    """The prefill's attention sums of the kept tokens (H2O), zeros for other methods. During
    the prefill slot == position, so the kept positions index the sums."""
    if observed is None or observed.column_sums is None:
        return jnp.zeros(context.positions.shape, jnp.float32)
    slots = jnp.maximum(context.positions, 0)
    return jnp.take_along_axis(observed.column_sums, slots, axis=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingKVCache:
    cache: DenseKVCache
    attention_sums: jax.Array  # [batch, kv_heads, slots] float32, attention each slot received
    method: Scorer = dataclasses.field(metadata=dict(static=True))  # scores at decode time
    budget: int = dataclasses.field(metadata=dict(static=True))  # tokens kept per stream

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.attention_sums.size * 4

    def context_nbytes(self, reserved: int) -> int:
        return self.nbytes()

    def append(self, keys, values, positions, valid) -> "EvictingKVCache":
        free = jnp.arange(self.cache.capacity) >= self.cache.lengths[..., None]
        return EvictingKVCache(self.cache.append(keys, values, positions, valid),
                               jnp.where(free, 0.0, self.attention_sums), self.method, self.budget)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        cache = self.cache
        out, _, probs = cache.partial(group_queries(queries, cache.keys.shape[1]), query_positions,
                                      sliding_window)
        sums = self.attention_sums + probs.sum(axis=(2, 3))
        scores = self.method.decode_scores(cache, probs, sums, query_positions,
                                                  self.budget)
        cache, sums = _evict_over_budget(cache, sums, scores, self.budget)
        return (out.reshape(queries.shape).astype(queries.dtype),
                EvictingKVCache(cache, sums, self.method, self.budget))


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
