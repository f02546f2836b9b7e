"""The KV state: the pytree every forward pass reads and returns, and every compression method edits.

A cache stores keys after RoPE together with the *original* position of each cached token, so
evicting a token never renumbers the others, and causal and sliding-window masks are computed from
positions rather than slot indices. Each (sequence, kv-head) stream has its own physical length:
slots `[0, length)` are valid, the rest are free. Batches are right-padded: the valid tokens of a
sequence form a prefix of each chunk, and writes of padding are dropped.

Layers are a tuple so each layer's cache can have its own capacity (layer-wise budgets, PyramidKV)
and its own kind (full precision, quantized, paged, ...). Every kind implements the `KVCache`
protocol; the model only ever appends and attends, and never looks inside.
"""

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from models.attention import causal_self_attention, merge, segment_attention

EMPTY_POSITION = -1


class KVCache(Protocol):
    """What the model sees of one layer's cache (gpt-fast's `KVCache.update`, split in two).

    `append(keys, values, positions, valid)`: keys and values [batch, tokens, kv_heads,
    head_dim] after RoPE, positions and valid [batch, tokens] (valid a prefix of each row); tokens
    that are not valid are dropped. Returns the cache.
    `attend(queries, query_positions, sliding_window)`: softmax attention of queries [batch,
    tokens, heads, head_dim] over what the cache holds (the tokens just appended included), a
    query seeing the slots at its own position or before (and, with a sliding window W, less
    than W positions back). Returns (output [batch, tokens, heads, head_dim], cache): a cache may
    update itself while attending (decode-time eviction, a quantization flush, observers).
    `nbytes()`: the bytes the cache holds.
    """

    def append(self, keys, values, positions, valid) -> "KVCache": ...

    def attend(self, queries, query_positions, sliding_window: int | None = None
               ) -> tuple[jax.Array, "KVCache"]: ...

    def nbytes(self) -> int: ...


def group_queries(queries, kv_heads: int):
    """[batch, tokens, heads, d] -> [batch, tokens, kv_heads, heads // kv_heads, d] (GQA groups)."""
    batch, tokens, heads, head_dim = queries.shape
    return queries.reshape(batch, tokens, kv_heads, heads // kv_heads, head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    """One layer's full-precision cache with a fixed number of slots per (sequence, kv-head)."""

    keys: jax.Array  # [batch, kv_heads, capacity, head_dim], post-RoPE
    values: jax.Array  # [batch, kv_heads, capacity, head_dim]
    positions: jax.Array  # [batch, kv_heads, capacity] int32, EMPTY_POSITION where free
    lengths: jax.Array  # [batch, kv_heads] int32, valid slots per stream

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.full(shape[:3], EMPTY_POSITION, jnp.int32),
                   lengths=jnp.zeros(shape[:2], jnp.int32))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def context_nbytes(self, reserved: int) -> int:
        """The bytes of the slots not `reserved` for tokens still to come."""
        return self.nbytes() * (self.capacity - reserved) // self.capacity

    def append(self, keys, values, positions, valid) -> "DenseKVCache":
        """Writes new tokens after each stream's valid slots.

        keys, values: [batch, tokens, kv_heads, head_dim]; positions: [batch, tokens] int32;
        valid: [batch, tokens] bool, a prefix of each row. Tokens that are not valid, or that do
        not fit, are dropped (never clamped onto valid slots).
        """
        batch, tokens, kv_heads, _ = keys.shape
        slots = self.lengths[:, :, None] + jnp.arange(tokens, dtype=jnp.int32)  # [b, h, t]
        slots = jnp.where(valid[:, None, :], slots, self.capacity)
        b = jnp.arange(batch)[:, None, None]
        h = jnp.arange(kv_heads)[None, :, None]
        write = lambda cache, new: cache.at[b, h, slots].set(new, mode="drop")
        return DenseKVCache(
            keys=write(self.keys, keys.transpose(0, 2, 1, 3).astype(self.keys.dtype)),
            values=write(self.values, values.transpose(0, 2, 1, 3).astype(self.values.dtype)),
            positions=write(self.positions,
                            jnp.broadcast_to(positions[:, None, :], slots.shape)),
            lengths=jnp.minimum(self.lengths + valid.sum(axis=1, dtype=jnp.int32)[:, None],
                                self.capacity))

    def partial(self, grouped_queries, query_positions, sliding_window: int | None = None):
        """Attention of grouped queries [batch, tokens, kv_heads, group, head_dim] over this cache:
        (normalised output, log-sum-exp, probabilities), see `models.attention`."""
        mask = self.visibility(query_positions, sliding_window)
        return segment_attention(grouped_queries, self.keys, self.values, mask)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        """Softmax attention of queries [batch, tokens, heads, head_dim] over the cache.

        A query sees a slot that is valid, whose position is not after its own and, with a sliding
        window W, is less than W positions back. Returns the output [batch, tokens, heads,
        head_dim] and the cache (unchanged here; caches that track attention update themselves).
        """
        out, _, _ = self.partial(group_queries(queries, self.keys.shape[1]), query_positions,
                                 sliding_window)
        return out.reshape(queries.shape).astype(queries.dtype), self

    def visibility(self, query_positions, sliding_window: int | None):
        """[batch, kv_heads, tokens, capacity] bool: which slots each query may attend to."""
        slot = jnp.arange(self.capacity, dtype=jnp.int32)
        in_use = (slot < self.lengths[:, :, None])[:, :, None, :]
        key_pos = self.positions[:, :, None, :]
        query_pos = query_positions[:, None, :, None]
        mask = in_use & (key_pos <= query_pos)
        if sliding_window is not None:
            mask &= query_pos - key_pos < sliding_window
        return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FreshPrefillCache:
    """An empty `DenseKVCache` about to take a whole prompt in one chunk: attention then reads
    nothing from the cache and runs fused over the chunk alone (`causal_self_attention`, cuDNN's flash
    attention on a GPU). `attend` returns the inner cache, so the wrapper lasts one chunk."""

    cache: DenseKVCache
    keys: jax.Array | None = None  # [batch, tokens, kv_heads, head_dim], the chunk appended
    values: jax.Array | None = None
    lengths: jax.Array | None = None  # [batch] valid tokens of the chunk

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def append(self, keys, values, positions, valid) -> "FreshPrefillCache":
        return FreshPrefillCache(self.cache.append(keys, values, positions, valid), keys, values,
                                 valid.sum(axis=1, dtype=jnp.int32))

    def self_attention(self, queries, sliding_window: int | None = None):
        """(output [batch, tokens, heads, head_dim], log-sum-exp [batch, tokens, heads]) of the
        chunk's queries over the chunk."""
        return causal_self_attention(queries, self.keys, self.values, self.lengths,
                                     sliding_window)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        out, _ = self.self_attention(queries, sliding_window)
        return out, self.cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlatKVCache:
    """A read-only cache whose kv-heads keep different numbers of tokens (head-wise budgets,
    AdaKV): the kept tokens of all heads of a layer share one flat slot axis, each slot tagged
    with its head, so the bytes held are the sum of the heads' budgets (the head-flattened layout
    of KVCache-Factory's AdaKV, with static shapes)."""

    keys: jax.Array  # [batch, slots, head_dim]
    values: jax.Array  # [batch, slots, head_dim]
    positions: jax.Array  # [batch, slots] int32
    heads: jax.Array  # [batch, slots] int32, the kv-head each slot belongs to
    lengths: jax.Array  # [batch] int32, valid slots per sequence

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def partial(self, grouped_queries, query_positions, sliding_window: int | None = None):
        kv_heads = grouped_queries.shape[2]
        slot = jnp.arange(self.keys.shape[1], dtype=jnp.int32)
        own = self.heads[:, None, :] == jnp.arange(kv_heads, dtype=jnp.int32)[None, :, None]
        usable = own & (slot < self.lengths[:, None])[:, None, :]  # [b, h, s]
        key_pos = self.positions[:, None, None, :]
        query_pos = query_positions[:, None, :, None]
        mask = usable[:, :, None, :] & (key_pos <= query_pos)
        if sliding_window is not None:
            mask &= query_pos - key_pos < sliding_window
        return segment_attention(grouped_queries, self.keys, self.values, mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentedCache:
    """A compressed context followed by an exact cache for everything appended after compression
    (the question and generated tokens); attention merges the two by log-sum-exp."""

    context: DenseKVCache | FlatKVCache
    recent: DenseKVCache

    def nbytes(self) -> int:
        return self.context.nbytes() + self.recent.nbytes()

    def context_nbytes(self, reserved: int) -> int:
        return self.context.nbytes()

    def append(self, keys, values, positions, valid) -> "SegmentedCache":
        return SegmentedCache(self.context, self.recent.append(keys, values, positions, valid))

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        grouped = group_queries(queries, self.recent.keys.shape[1])
        parts = [segment.partial(grouped, query_positions, sliding_window)[:2]
                 for segment in (self.context, self.recent)]
        return merge(parts).reshape(queries.shape).astype(queries.dtype), self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVState:
    """Every layer's cache plus each sequence's logical length (the position of its next token)."""

    layers: tuple
    next_positions: jax.Array  # [batch] int32

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def map_layers(self, fn) -> "KVState":
        return KVState(layers=tuple(fn(layer) for layer in self.layers),
                       next_positions=self.next_positions)

    @classmethod
    def empty(cls, config, batch: int, capacity: int, dtype) -> "KVState":
        layers = tuple(
            DenseKVCache.empty(batch, config.num_kv_heads, capacity, config.head_dim, dtype)
            for _ in range(config.num_layers))
        return cls(layers=layers,
                   next_positions=jnp.zeros((batch,), jnp.int32))
