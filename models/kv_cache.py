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

    AXES = dict(keys=("batch", "kv_heads", "slots", "head_dim"),
                values=("batch", "kv_heads", "slots", "head_dim"),
                positions=("batch", "kv_heads", "slots"), lengths=("batch", "kv_heads"))

    def logical_axes(self) -> "DenseKVCache":
        """This cache with each array replaced by its logical axis names (a tuple per array;
        map with the cache first: `jax.tree.map(f, cache, cache.logical_axes())`)."""
        return dataclasses.replace(self, **self.AXES)

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

    AXES = dict(keys=("batch", "tokens", "kv_heads", "head_dim"),
                values=("batch", "tokens", "kv_heads", "head_dim"), lengths=("batch",))

    def logical_axes(self) -> "FreshPrefillCache":
        return FreshPrefillCache(self.cache.logical_axes(), **{
            name: None if getattr(self, name) is None else axes
            for name, axes in self.AXES.items()})

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
class PagedKVCache:
    """One layer's cache whose kv-heads hold different numbers of tokens (head-wise budgets,
    AdaKV; DESIGN.md decisions 3 and 14): a pool of fixed-size pages shared by the layer's
    kv-heads, a page table per (sequence, kv-head) stream and per-stream lengths (the paged
    layout of KV-Compress and vLLM, with static shapes).

    Token i of stream (b, h) sits in row i % page_size of pool page page_table[b, h, i //
    page_size]; only a stream's first ceil(length / page_size) table entries are meaningful.
    The pages in use are a prefix of the pool (the next free page is their count), and free rows
    hold EMPTY_POSITION. Each stream wastes less than one page, so the bytes held follow the
    kept tokens; the pool is sized by the builder for the worst split of its tokens over heads.
    """

    keys: jax.Array  # [batch, pages, page_size, head_dim], post-RoPE
    values: jax.Array  # [batch, pages, page_size, head_dim]
    positions: jax.Array  # [batch, pages, page_size] int32, EMPTY_POSITION where free
    page_table: jax.Array  # [batch, kv_heads, stream_pages] int32, pool page of each stream page
    lengths: jax.Array  # [batch, kv_heads] int32, tokens per stream

    AXES = dict(keys=("batch", "pages", "page", "head_dim"),
                values=("batch", "pages", "page", "head_dim"),
                positions=("batch", "pages", "page"),
                page_table=("batch", "kv_heads", "stream_pages"),
                lengths=("batch", "kv_heads"))

    @classmethod
    def empty(cls, batch: int, kv_heads: int, pages: int, page_size: int, stream_pages: int,
              head_dim: int, dtype) -> "PagedKVCache":
        shape = (batch, pages, page_size, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.full(shape[:3], EMPTY_POSITION, jnp.int32),
                   page_table=jnp.zeros((batch, kv_heads, stream_pages), jnp.int32),
                   lengths=jnp.zeros((batch, kv_heads), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.keys.shape[2]

    @property
    def pages(self) -> int:
        return self.keys.shape[1]

    def logical_axes(self) -> "PagedKVCache":
        return dataclasses.replace(self, **self.AXES)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def pages_used(self, lengths=None):
        """[batch, kv_heads] int32: pages each stream fills (of `lengths`, by default its own)."""
        lengths = self.lengths if lengths is None else lengths
        return -(-lengths // self.page_size)

    def page_owners(self):
        """[batch, pages] int32: the kv-head whose stream holds each pool page, -1 if free."""
        batch, kv_heads, stream_pages = self.page_table.shape
        in_use = jnp.arange(stream_pages) < self.pages_used()[:, :, None]
        page = jnp.where(in_use, self.page_table, self.pages)  # unused entries are dropped
        head = jnp.broadcast_to(jnp.arange(kv_heads, dtype=jnp.int32)[None, :, None], page.shape)
        return jnp.full((batch, self.pages), -1, jnp.int32).at[
            jnp.arange(batch)[:, None, None], page].set(head, mode="drop")

    def append(self, keys, values, positions, valid) -> "PagedKVCache":
        """Writes new tokens after each stream's tokens: into its last page while that has room,
        then into free pool pages taken in order. Tokens that do not fit (pool or page table
        full) are dropped, as `DenseKVCache.append` drops them. In practice a head-wise context
        is read-only: the `SegmentedCache` it sits in appends to its exact `recent` part.

        keys, values: [batch, tokens, kv_heads, head_dim]; positions, valid: [batch, tokens]."""
        batch, tokens, kv_heads, head_dim = keys.shape
        stream_pages = self.page_table.shape[2]
        old = self.pages_used()
        wanted = jnp.minimum(self.pages_used(self.lengths + valid.sum(axis=1, dtype=jnp.int32
                                                                      )[:, None]), stream_pages)
        first_new = old.sum(axis=1, keepdims=True) + jnp.cumsum(wanted - old, axis=1) - (
            wanted - old)  # [b, h], pool page of each stream's first new page
        grown = old + jnp.clip(self.pages - first_new, 0, wanted - old)
        m = jnp.arange(stream_pages, dtype=jnp.int32)
        table = jnp.where((m >= old[..., None]) & (m < grown[..., None]),
                          first_new[..., None] + m - old[..., None], self.page_table)
        lengths = jnp.minimum(self.lengths + valid.sum(axis=1, dtype=jnp.int32)[:, None],
                              grown * self.page_size)
        index = self.lengths[..., None] + jnp.arange(tokens, dtype=jnp.int32)  # [b, h, t]
        page = jnp.take_along_axis(table, jnp.minimum(index // self.page_size, stream_pages - 1),
                                   axis=2)
        slot = jnp.where(index < lengths[..., None], page * self.page_size
                         + index % self.page_size, self.pages * self.page_size)
        b = jnp.arange(batch)[:, None, None]

        def write(pool, new):
            flat = pool.reshape(batch, self.pages * self.page_size, *pool.shape[3:])
            return flat.at[b, slot].set(new.astype(pool.dtype), mode="drop").reshape(pool.shape)

        return PagedKVCache(
            keys=write(self.keys, keys.transpose(0, 2, 1, 3)),
            values=write(self.values, values.transpose(0, 2, 1, 3)),
            positions=write(self.positions, jnp.broadcast_to(positions[:, None, :], slot.shape)),
            page_table=table, lengths=lengths)

    def partial(self, grouped_queries, query_positions, sliding_window: int | None = None):
        """Attention of grouped queries [batch, tokens, kv_heads, group, head_dim]: every
        kv-head's queries score the whole pool, a row counting for the head that owns its page.
        This reads the pool once (the bytes held); a paged-attention kernel would walk each
        head's pages through the page table instead. Returns (output, log-sum-exp, probs)."""
        batch, pages, page_size, head_dim = self.keys.shape
        kv_heads = grouped_queries.shape[2]
        own = self.page_owners()[:, None, :] == jnp.arange(kv_heads, dtype=jnp.int32)[None, :, None]
        key_pos = self.positions.reshape(batch, 1, 1, pages * page_size)
        usable = jnp.repeat(own, page_size, axis=2)[:, :, None, :] & (key_pos != EMPTY_POSITION)
        query_pos = query_positions[:, None, :, None]
        mask = usable & (key_pos <= query_pos)
        if sliding_window is not None:
            mask &= query_pos - key_pos < sliding_window
        flat = lambda x: x.reshape(batch, pages * page_size, head_dim)
        return segment_attention(grouped_queries, flat(self.keys), flat(self.values), mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentedCache:
    """A compressed context followed by an exact cache for everything appended after compression
    (the question and generated tokens); attention merges the two by log-sum-exp."""

    context: DenseKVCache | PagedKVCache
    recent: DenseKVCache

    def logical_axes(self) -> "SegmentedCache":
        return SegmentedCache(self.context.logical_axes(), self.recent.logical_axes())

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

    def logical_axes(self) -> "KVState":
        """The state with each array replaced by its logical axis names: "batch", "kv_heads",
        "slots" (a dense stream's slots), "pages", "page" and "stream_pages" (a paged pool's
        pages, the rows of a page, a stream's page-table entries), "tokens", "head_dim"."""
        return KVState(layers=tuple(layer.logical_axes() for layer in self.layers),
                       next_positions=("batch",))

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
