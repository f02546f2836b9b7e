"""The KV state: the pytree every forward pass reads and returns, and every compression method edits.

A cache stores keys after RoPE together with the *original* position of each cached token, so
evicting a token never renumbers the others, and causal and sliding-window masks are computed from
positions rather than slot indices. Each (sequence, kv-head) stream has its own physical length:
slots `[0, length)` are valid, the rest are free. Batches are right-padded: the valid tokens of a
sequence form a prefix of each chunk, and writes of padding are dropped.

Layers are a tuple so each layer's cache can have its own capacity (layer-wise budgets, PyramidKV)
and its own kind (full precision, quantized, ...). A cache kind implements `append` and `attend`;
the model never looks inside.
"""

import dataclasses

import jax
import jax.numpy as jnp

EMPTY_POSITION = -1


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

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        """Softmax attention of queries [batch, tokens, heads, head_dim] over the cache.

        A query sees a slot that is valid, whose position is not after its own and, with a sliding
        window W, is less than W positions back. Returns [batch, tokens, heads, head_dim].
        """
        batch, tokens, heads, head_dim = queries.shape
        kv_heads = self.keys.shape[1]
        q = queries.reshape(batch, tokens, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bthgd,bhcd->bhgtc", q, self.keys,
                            preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
        mask = self.visibility(query_positions, sliding_window)[:, :, None]  # [b, h, 1, t, c]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhgtc,bhcd->bthgd", probs.astype(self.values.dtype), self.values,
                         preferred_element_type=jnp.float32)
        return out.reshape(batch, tokens, heads, head_dim).astype(queries.dtype)

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
class KVState:
    """Every layer's cache plus each sequence's logical length (the position of its next token)."""

    layers: tuple
    next_positions: jax.Array  # [batch] int32

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @classmethod
    def empty(cls, config, batch: int, capacity: int, dtype) -> "KVState":
        layers = tuple(
            DenseKVCache.empty(batch, config.num_kv_heads, capacity, config.head_dim, dtype)
            for _ in range(config.num_layers))
        return cls(layers=layers,
                   next_positions=jnp.zeros((batch,), jnp.int32))
