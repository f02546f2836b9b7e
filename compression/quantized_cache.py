"""A bit-packed quantized KV cache with a full-precision residual window, after KIVI (Liu et al.,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024; the rules below are
those of `llama_kivi.py` in jy-yuan/KIVI). A store (`kivi2`, `int8`, ...) says how keys and values
are quantized and how many of the newest tokens R stay in full precision; this cache does the rest.

Each sequence holds n tokens in position order (the kept context, then the question and the
generated tokens). Its oldest tokens are bit-packed (`pallas_kernels.kv_packing.QuantizedTensor`),
the newest stay exact:

- values: tokens [0, Lv) quantized, Lv = max(0, n - R): the residual is a sliding window of the R
  newest values (KIVI quantizes the oldest residual value once there are R + 1);
- keys quantized per channel (KIVI): tokens [0, Lk), Lk = R * floor(n / R): keys go in whole
  R-token blocks, so every group of G tokens sharing a scale holds G distinct tokens (a one-token
  flush would make min == max and store nothing useful); keys quantized per token: Lk = Lv.

Since Lv <= Lk, the residual holds tokens [Lv, n) (R slots at rest) with their values, keys and
positions; the keys of its tokens before Lk are read from the quantized part, as KIVI reads them.

`Store.convert` builds the cache from the compressed context by this rule (KIVI's prefill rule).
`append` stages new tokens in the residual and `attend` attends with them in full precision, then
quantizes what has fallen due (KIVI quantizes after the attention that filled the residual). The
flush is a masked write over static shapes, so every decode step is the same compiled program.

Attention is the quantized part [0, Lv) merged by log-sum-exp with the exact residual window:
single-token queries read the quantized part through `quantized_decode_attention` (the Pallas
kernel on a GPU), multi-token queries (the question) and sliding-window models through the
dequantized reference. Every quantized token precedes every query, so the quantized part needs no
causal mask; its positions are kept only for sliding-window models. All kv-heads of a layer hold
the same number of tokens (head-wise budgets are refused), so lengths are per sequence.
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.base import Budget, Compressor, Store
from compression.select import round_up
from models.attention import merge, segment_attention
from pallas_kernels.errors import UserError
from models.kv_cache import EMPTY_POSITION, DenseKVCache, SegmentedCache, group_queries
from models.config import ModelConfig
from pallas_kernels.kv_packing import QuantizedTensor, dequantize, unpack_codes
from pallas_kernels.quantized_attention import quantized_decode_attention


@dataclasses.dataclass(frozen=True)
class QuantizedStore(Store):
    """Base of the quantized stores: `quantize_keys` and `quantize_values` map [B, H, T, D] to a
    `QuantizedTensor`; the `residual` newest tokens stay in full precision; with
    `per_channel_keys`, keys share scales over `group_size` tokens and are flushed in R-blocks."""

    residual = 0
    per_channel_keys = False

    def quantize_keys(self, x) -> QuantizedTensor:
        raise NotImplementedError

    def quantize_values(self, x) -> QuantizedTensor:
        raise NotImplementedError

    @property
    def token_group(self) -> int:
        """Tokens that share a key scale; the quantized capacity is a multiple of it."""
        return self.group_size if self.per_channel_keys else 1

    def check_compatible(self, first: Compressor) -> None:
        if first.capabilities.head_wise:
            raise UserError(f"{type(first).__name__} gives each kv-head its own budget, which a "
                            "quantized store cannot hold; put the store after a method with one "
                            "budget per layer, e.g. snapkv+kivi2")

    def convert(self, layer: SegmentedCache, config: ModelConfig, budget: Budget):
        return QuantizedKVCache.build(self, layer.context, layer.recent.capacity,
                                      keep_positions=config.sliding_window is not None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
    """One layer's quantized cache (see the module docstring for the rules)."""

    keys: QuantizedTensor  # dequantized shape [B, H, capacity, D]; tokens [0, key_lengths)
    values: QuantizedTensor  # tokens [0, value_lengths)
    positions: jax.Array | None  # [B, H, capacity] int32; sliding-window models only
    residual_keys: jax.Array  # [B, H, S, D], tokens [value_lengths, lengths); S = R at rest
    residual_values: jax.Array  # [B, H, S, D]
    residual_positions: jax.Array  # [B, H, S] int32
    key_lengths: jax.Array  # [B] int32, Lk
    value_lengths: jax.Array  # [B] int32, Lv
    lengths: jax.Array  # [B] int32, n
    store: QuantizedStore = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def build(cls, store: QuantizedStore, context: DenseKVCache, future: int,
              keep_positions: bool) -> "QuantizedKVCache":
        """KIVI's prefill rule on a compressed context (kept tokens in slots [0, n) in position
        order, n the same in every kv-head), with room for `future` tokens appended later.
        Slots [Lk, capacity) of the quantized part hold codes of no use until a flush writes
        them (key groups never straddle Lk, a multiple of G)."""
        slots = context.capacity
        capacity = round_up(slots + future, store.token_group)
        pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, 0), (0, capacity - slots)]
                                        + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        n, r = context.lengths[:, 0], store.residual
        value_lengths = jnp.maximum(n - r, 0)
        key_lengths = n // r * r if store.per_channel_keys else value_lengths
        recent = lambda x: _gather(x, value_lengths[:, None] + jnp.arange(r))
        return cls(store.quantize_keys(pad(context.keys)),
                   store.quantize_values(pad(context.values)),
                   pad(context.positions, EMPTY_POSITION) if keep_positions else None,
                   recent(context.keys), recent(context.values), recent(context.positions),
                   key_lengths, value_lengths, n, store)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def context_nbytes(self, reserved: int) -> int:
        return self.nbytes()

    def append(self, keys, values, positions, valid) -> "QuantizedKVCache":
        """Stages new tokens (keys, values [B, t, H, D]; positions, valid [B, t], valid a prefix
        of each row) after the residual's tokens: the residual grows by t slots, and the next
        `attend` sees them exactly, then flushes."""
        batch, new, heads, _ = keys.shape
        size = self.residual_keys.shape[2]
        index = jnp.arange(new, dtype=jnp.int32)[None, :]
        counts = valid.sum(axis=1, dtype=jnp.int32)
        rows = jnp.where(index < counts[:, None],
                         (self.lengths - self.value_lengths)[:, None] + index, size + new)

        def put(old, x, fill):
            grown = jnp.concatenate(
                [old, jnp.full((*old.shape[:2], new, *old.shape[3:]), fill, old.dtype)], axis=2)
            return _scatter(grown, rows, x)

        per_head = lambda x: x.transpose(0, 2, 1, 3)
        return dataclasses.replace(
            self, residual_keys=put(self.residual_keys, per_head(keys), 0),
            residual_values=put(self.residual_values, per_head(values), 0),
            residual_positions=put(self.residual_positions,
                                   jnp.broadcast_to(positions[:, None, :], (batch, heads, new)),
                                   EMPTY_POSITION),
            lengths=self.lengths + counts)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        """Attention of queries [B, t, heads, D]; returns the output and the flushed cache."""
        grouped = group_queries(queries, self.residual_keys.shape[1])
        parts = [self._quantized_part(grouped, query_positions, sliding_window),
                 self._residual_part(grouped, query_positions, sliding_window)]
        return merge(parts).reshape(queries.shape).astype(queries.dtype), self._flush()

    def _flush(self) -> "QuantizedKVCache":
        """Quantizes the values (and per-token keys) that fell out of the R-token window and the
        keys' completed R-blocks; the residual shrinks back to R slots."""
        store, r = self.store, self.store.residual
        n, value_lengths = self.lengths, self.value_lengths
        new_value_lengths = jnp.maximum(n - r, 0)
        new_key_lengths = n // r * r if store.per_channel_keys else new_value_lengths
        oldest = self.residual_keys.shape[2] - r  # static bound on the values falling due
        index = jnp.arange(oldest)[None, :]
        rows = jnp.where(index < (new_value_lengths - value_lengths)[:, None],
                         value_lengths[:, None] + index, self.capacity)
        head = lambda x: x[:, :, :oldest]
        values = _write(self.values, store.quantize_values(head(self.residual_values)), rows, rows)
        if store.per_channel_keys:
            keys = self._flush_key_blocks(new_key_lengths)
        else:
            keys = _write(self.keys, store.quantize_keys(head(self.residual_keys)), rows, rows)
        positions = self.positions
        if positions is not None:
            positions = _scatter(positions, rows, head(self.residual_positions))
        kept = (new_value_lengths - value_lengths)[:, None] + jnp.arange(r)
        keep = lambda x: _gather(x, kept)
        return QuantizedKVCache(keys, values, positions, keep(self.residual_keys),
                                keep(self.residual_values), keep(self.residual_positions),
                                new_key_lengths, new_value_lengths, n, store)

    def _flush_key_blocks(self, new_key_lengths) -> QuantizedTensor:
        """KIVI keys: the residual's keys from Lk on, in whole R-token blocks, quantized per
        channel (G-token groups aligned to each block) and written to [Lk, new Lk)."""
        r, group = self.store.residual, self.store.group_size
        blocks = self.residual_keys.shape[2] // r * r  # static bound on the keys falling due
        start = self.key_lengths - self.value_lengths  # residual slot of token Lk
        index = jnp.arange(blocks)[None, :]
        quantized = self.store.quantize_keys(_gather(self.residual_keys, start[:, None] + index))
        due = (new_key_lengths - self.key_lengths)[:, None]
        rows = jnp.where(index < due, self.key_lengths[:, None] + index, self.capacity)
        groups = jnp.arange(blocks // group)[None, :]
        group_rows = jnp.where(groups * group < due, self.key_lengths[:, None] // group + groups,
                               self.capacity // group)
        return _write(self.keys, quantized, rows, group_rows)

    def _quantized_part(self, grouped, query_positions, sliding_window):
        """(output, lse) of grouped queries [B, t, H, g, D] over the quantized tokens [0, Lv)."""
        batch, tokens, kv_heads, group, head_dim = grouped.shape
        if tokens == 1 and sliding_window is None:
            out, lse = quantized_decode_attention(
                grouped.reshape(batch, kv_heads * group, head_dim), self.keys, self.values,
                self.value_lengths)
            return out.reshape(grouped.shape), lse.reshape(batch, 1, kv_heads, group)
        in_use = jnp.arange(self.capacity) < self.value_lengths[:, None]
        mask = jnp.broadcast_to(in_use[:, None, None, :],
                                (batch, kv_heads, tokens, self.capacity))
        if sliding_window is not None:
            mask &= (query_positions[:, None, :, None] - self.positions[:, :, None, :]
                     < sliding_window)
        dtype = self.residual_keys.dtype
        return segment_attention(grouped, dequantize(self.keys, dtype),
                                 dequantize(self.values, dtype), mask)[:2]

    def _residual_part(self, grouped, query_positions, sliding_window):
        """(output, lse) over the residual tokens [Lv, n), causal by position; keys of tokens
        before Lk come dequantized from the quantized part."""
        size = self.residual_keys.shape[2]
        keys = self.residual_keys
        if self.store.per_channel_keys:
            tokens = self.value_lengths[:, None] + jnp.arange(size)
            quantized = (tokens < self.key_lengths[:, None])[:, None, :, None]
            keys = jnp.where(quantized, _dequantized_key_rows(self.keys, tokens, keys.dtype), keys)
        heads = keys.shape[1]
        lengths = jnp.broadcast_to((self.lengths - self.value_lengths)[:, None],
                                   (keys.shape[0], heads))
        window = DenseKVCache(keys, self.residual_values, self.residual_positions, lengths)
        return window.partial(grouped, query_positions, sliding_window)[:2]


def _scatter(x, rows, new):
    """x[b, h, rows[b, i]] = new[b, h, i] for every kv-head h; rows out of range are dropped."""
    b = jnp.arange(x.shape[0])[:, None, None]
    h = jnp.arange(x.shape[1])[None, :, None]
    return x.at[b, h, rows[:, None, :]].set(new.astype(x.dtype), mode="drop")


def _gather(x, rows):
    """x[b, h, rows[b, i]] for every kv-head h, rows clipped into range: [B, H, t, ...]."""
    b = jnp.arange(x.shape[0])[:, None, None]
    h = jnp.arange(x.shape[1])[None, :, None]
    return x[b, h, jnp.clip(rows, 0, x.shape[2] - 1)[:, None, :]]


def _write(qt: QuantizedTensor, new: QuantizedTensor, rows, scale_rows) -> QuantizedTensor:
    """Writes the tokens of `new` at `rows` [B, t] of `qt`, their scales and zeros at
    `scale_rows` (per token: the same rows; per channel: the G-token groups)."""
    zero = None if qt.zero is None else _scatter(qt.zero, scale_rows, new.zero)
    return dataclasses.replace(qt, codes=_scatter(qt.codes, rows, new.codes),
                               scale=_scatter(qt.scale, scale_rows, new.scale), zero=zero)


def _dequantized_key_rows(keys: QuantizedTensor, rows, dtype):
    """Tokens `rows` [B, t] of per-channel quantized keys, dequantized as `dequantize` does."""
    groups = rows // keys.group_size
    codes = unpack_codes(_gather(keys.codes, rows), keys.bits).astype(jnp.float32)
    scale = _gather(keys.scale, groups).astype(jnp.float32)
    return (codes * scale + _gather(keys.zero, groups).astype(jnp.float32)).astype(dtype)
