"""What scorers observe while the context is prefilled, accumulated chunk by chunk.

A method says what it needs (`Needs`); the prefill then keeps, per layer, only that:
- the last W post-RoPE queries of each context (SnapKV, PyramidKV, TOVA, AdaKV's default scorer);
- the sum and sum of outer products of pre-RoPE queries past the sink tokens (ExpectedAttention);
- the attention each cached key received, summed over all queries (H2O).
Nothing N x N is kept: the column sums come from each chunk's attention as it runs
(`seen_column_sums`), or, in a one-piece prefill, from the column-sum kernel
(`pallas_kernels.column_sums`).

The model knows nothing of this: `ObservingCache` wraps a layer's cache during the prefill and
watches the queries that attend through it. The model hands a cache post-RoPE queries only; the
pre-RoPE ones (query statistics) are recovered by undoing RoPE at the queries' positions, exact up
to float32 rounding.
"""

import dataclasses

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.kv_cache import DenseKVCache, FreshPrefillCache, KVState, group_queries
from models.rope import undo_rope
from pallas_kernels.column_sums import attention_column_sums


@dataclasses.dataclass(frozen=True)
class Needs:
    window: int = 0  # how many of the context's last queries
    query_statistics_after: int | None = None  # first position counted (sinks excluded)
    column_sums: bool = False

    def any(self) -> bool:
        return bool(self.window or self.query_statistics_after is not None or self.column_sums)

    def union(self, other: "Needs") -> "Needs":
        stats = [s for s in (self.query_statistics_after, other.query_statistics_after)
                 if s is not None]
        return Needs(max(self.window, other.window), min(stats) if stats else None,
                     self.column_sums or other.column_sums)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerObservations:
    window_queries: jax.Array | None = None  # [batch, W, heads, head_dim], newest last
    window_positions: jax.Array | None = None  # [batch, W] int32, -1 where unfilled
    query_sum: jax.Array | None = None  # [batch, heads, head_dim] float32
    query_outer: jax.Array | None = None  # [batch, heads, head_dim, head_dim] float32
    query_count: jax.Array | None = None  # [batch] float32
    column_sums: jax.Array | None = None  # [batch, kv_heads, capacity] float32

    @classmethod
    def empty(cls, needs: Needs, batch: int, heads: int, kv_heads: int, head_dim: int,
              capacity: int) -> "LayerObservations":
        fields = {}
        if needs.window:
            fields["window_queries"] = jnp.zeros((batch, needs.window, heads, head_dim), jnp.float32)
            fields["window_positions"] = jnp.full((batch, needs.window), -1, jnp.int32)
        if needs.query_statistics_after is not None:
            fields["query_sum"] = jnp.zeros((batch, heads, head_dim), jnp.float32)
            fields["query_outer"] = jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32)
            fields["query_count"] = jnp.zeros((batch,), jnp.float32)
        if needs.column_sums:
            fields["column_sums"] = jnp.zeros((batch, kv_heads, capacity), jnp.float32)
        return cls(**fields)

    def update(self, needs: Needs, queries_pre_rope, queries, column_sums, positions, valid):
        """Adds one chunk: queries [b, t, heads, d] (before and after RoPE), the attention each
        cache slot received from the chunk's valid queries [b, kv_heads, slots <= capacity]
        (None unless `needs.column_sums`), positions and valid [b, t]."""
        new = {}
        if needs.window:
            new["window_queries"], new["window_positions"] = _keep_last(
                self.window_queries, self.window_positions, queries.astype(jnp.float32),
                jnp.where(valid, positions, -1))
        if needs.query_statistics_after is not None:
            counted = (valid & (positions >= needs.query_statistics_after)).astype(jnp.float32)
            q = queries_pre_rope.astype(jnp.float32) * counted[:, :, None, None]
            new["query_sum"] = self.query_sum + q.sum(axis=1)
            new["query_outer"] = self.query_outer + jnp.einsum("bthd,bthe->bhde", q, q)
            new["query_count"] = self.query_count + counted.sum(axis=1)
        if needs.column_sums:
            missing = self.column_sums.shape[2] - column_sums.shape[2]
            new["column_sums"] = self.column_sums + jnp.pad(column_sums,
                                                            ((0, 0), (0, 0), (0, missing)))
        return dataclasses.replace(self, **new)


def seen_column_sums(probs, valid):
    """Attention probabilities [b, kv_heads, group, t, slots] -> what each slot received from
    the valid queries, summed over the group: [b, kv_heads, slots]."""
    return (probs * valid[:, None, None, :, None]).sum(axis=(2, 3))


def _keep_last(kept, kept_positions, new, new_positions):
    """The last W valid entries of (kept ++ new) per row, oldest first and right-aligned (the
    newest in the last slot); a position of -1 marks an empty entry. kept: [b, W, ...];
    new: [b, t, ...]."""
    window = kept.shape[1]
    values = jnp.concatenate([kept, new], axis=1)
    positions = jnp.concatenate([kept_positions, new_positions], axis=1)
    present = positions >= 0
    total = present.sum(axis=1, keepdims=True)
    rank = jnp.cumsum(present, axis=1) - 1
    slot = rank - total + window  # right-aligned: the newest entry lands in the last slot
    slot = jnp.where(present & (slot >= 0), slot, window)
    rows = jnp.arange(values.shape[0])[:, None]
    out = jnp.zeros_like(kept).at[rows, slot].set(values, mode="drop")
    out_positions = jnp.full_like(kept_positions, -1).at[rows, slot].set(positions, mode="drop")
    return out, out_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObservingCache:
    """A layer's cache during the context's prefill, recording what `needs` asks for.

    `cache` is a `DenseKVCache` (chunked prefill: the chunk attends to the cache and its
    probabilities give the column sums) or a `FreshPrefillCache` (a prompt in one piece: fused
    attention, the column sums from the kernel with the attention's log-sum-exp)."""

    cache: DenseKVCache | FreshPrefillCache
    observations: LayerObservations
    positions: jax.Array | None = None  # [batch, tokens] of the chunk appended
    valid: jax.Array | None = None
    needs: Needs = dataclasses.field(default=Needs(), metadata=dict(static=True))
    config: ModelConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))  # a FreshPrefillCache

    @classmethod
    def watch(cls, cache, observations: LayerObservations, needs: Needs, config: ModelConfig,
              fresh: bool) -> "ObservingCache":
        """`cache` watched; `fresh`: it is empty and takes the whole prompt in one chunk."""
        return cls(FreshPrefillCache(cache) if fresh else cache, observations, needs=needs,
                   config=config, fresh=fresh)

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def append(self, keys, values, positions, valid) -> "ObservingCache":
        return dataclasses.replace(self, cache=self.cache.append(keys, values, positions, valid),
                                   positions=positions, valid=valid)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        positions, valid = self.positions, self.valid
        if self.fresh:
            out, lse = self.cache.self_attention(queries, sliding_window)
            cache = self.cache.cache
            sums = (attention_column_sums(queries, self.cache.keys, lse, self.cache.lengths,
                                          window=sliding_window)
                    if self.needs.column_sums else None)
        else:
            cache = self.cache
            grouped, probs = cache.partial(group_queries(queries, cache.keys.shape[1]),
                                           query_positions, sliding_window)[::2]
            out = grouped.reshape(queries.shape).astype(queries.dtype)
            sums = seen_column_sums(probs, valid) if self.needs.column_sums else None
        queries_pre_rope = (undo_rope(queries, positions, self.config)
                            if self.needs.query_statistics_after is not None else None)
        observations = self.observations.update(self.needs, queries_pre_rope, queries, sums,
                                                positions, valid)
        return out, ObservingCache(cache, observations, needs=self.needs, config=self.config)


def watch(kv_state: KVState, needs: Needs, observations, config: ModelConfig,
          fresh: bool) -> KVState:
    """The KV state with every layer watched (`ObservingCache`), for a prefill; `fresh`: the
    state is empty and takes the whole prompt in one chunk."""
    return KVState(layers=tuple(ObservingCache.watch(cache, observed, needs, config, fresh)
                                for cache, observed in zip(kv_state.layers, observations)),
                   next_positions=kv_state.next_positions)


def unwatch(kv_state: KVState) -> tuple[KVState, tuple[LayerObservations, ...]]:
    """(the KV state as the prefill left it, what each layer observed)."""
    return (kv_state.map_layers(lambda layer: layer.cache),
            tuple(layer.observations for layer in kv_state.layers))
