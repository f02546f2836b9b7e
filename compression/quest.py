"""Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024; mit-han-lab/Quest): every token stays in memory, and each decode step reads only the
pages whose keys can matter to the current query.

    --compress=quest --kv_budget=K*S      (S = page_size, 16 by default)

Algorithm, per layer and kv-head (the reference is `pallas_kernels/quest_reference.py`):
1. The cache is kept in pages of S consecutive slots; each page keeps the element-wise min m and
   max M of its post-RoPE keys, updated as tokens are appended (a partially filled last page
   included).
2. At each decode step a page's score is the upper bound sum_i max(q_i * m_i, q_i * M_i) on the
   query's dot product with any key of the page. The query heads of a GQA group are aggregated by
   the **max** of their bounds, so the score stays an upper bound for every head of the group.
3. The K = kv_budget // S best pages are selected per kv-head; the page holding the newest token
   is always one of them (Quest's kernel version: the budget includes it), and exact attention
   runs over the selected pages only. With no more pages in use than K, attention is full.
4. The first `dense_layers` (2) layers and every multi-token forward (the context's prefill, the
   question) use full attention, as in the paper.

Deviations from the reference code, on purpose:
- GQA: Quest's kernels are MHA-only and its accuracy simulation lets every query head pick its
  own pages (K/V repeated); here a kv-head's group shares one selection (max of the bounds), so
  the pages are read once per kv-head.
- Budget semantics of the kernel version (the newest page forced, no minimum of 3 pages),
  not of the simulation (top-max(3, B // S) pages, nothing forced).
- "The first two layers" means layer indices 0 and 1 of any depth (the simulation numbers
  layers by counting down from 32, which is right for 32-layer models only).
- A sliding-window model (Mistral) selects among all pages and masks the window afterwards.

Quest saves reads, not memory: the cache keeps every token plus 2 * D values per page and
kv-head of metadata, which `nbytes` counts. Works as a store alone (`quest`); composing it after
an eviction method or over a quantized (KIVI) cache is not supported.
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.base import Budget, Capabilities, Compressor, Store
from compression.select import round_up
from pallas_kernels.errors import UserError
from models.kv_cache import DenseKVCache, SegmentedCache, group_queries
from models.config import ModelConfig
from pallas_kernels.quest_attention import quest_decode_attention
from pallas_kernels.quest_reference import page_metadata
from pallas_kernels.quest_select import quest_select


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestCache:
    """One layer's whole cache in pages of `page_size` slots with each page's key min / max."""

    cache: DenseKVCache  # capacity a multiple of page_size
    page_min: jax.Array  # [batch, kv_heads, pages, head_dim], +inf for pages not in use
    page_max: jax.Array  # [batch, kv_heads, pages, head_dim], -inf for pages not in use
    page_size: int = dataclasses.field(metadata=dict(static=True))
    n_select: int | None = dataclasses.field(metadata=dict(static=True))  # None: every page

    @classmethod
    def from_cache(cls, cache: DenseKVCache, page_size: int, n_select: int | None):
        page_min, page_max = page_metadata(cache.keys, cache.lengths, page_size)
        return cls(cache, page_min, page_max, page_size, n_select)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def context_nbytes(self, reserved: int) -> int:
        return self.nbytes()

    def append(self, keys, values, positions, valid) -> "QuestCache":
        """Appends like `DenseKVCache.append` and folds the new keys into their pages' min and
        max (a scatter-min / max; dropped tokens land on a page past the end and are dropped)."""
        cache = self.cache
        tokens = keys.shape[1]
        slots = cache.lengths[:, :, None] + jnp.arange(tokens, dtype=jnp.int32)
        slots = jnp.where(valid[:, None, :], slots, cache.capacity)
        page = slots // self.page_size  # [b, h, t]
        b = jnp.arange(keys.shape[0])[:, None, None]
        h = jnp.arange(keys.shape[2])[None, :, None]
        new = keys.transpose(0, 2, 1, 3).astype(self.page_min.dtype)
        return QuestCache(cache.append(keys, values, positions, valid),
                          self.page_min.at[b, h, page].min(new, mode="drop"),
                          self.page_max.at[b, h, page].max(new, mode="drop"),
                          self.page_size, self.n_select)

    def attend(self, queries, query_positions, sliding_window: int | None = None):
        """Full attention for multi-token queries (prefill, question) and with no budget; at a
        decode step, attention over the selected pages."""
        batch, tokens, heads, head_dim = queries.shape
        if tokens > 1 or self.n_select is None:
            out, _, _ = self.cache.partial(group_queries(queries, self.cache.keys.shape[1]),
                                           query_positions, sliding_window)
            return out.reshape(queries.shape).astype(queries.dtype), self
        q = queries[:, 0]
        pages, count = quest_select(q, self.page_min, self.page_max, self.cache.lengths,
                                    self.page_size, self.n_select)
        window = {} if sliding_window is None else dict(
            key_positions=self.cache.positions, query_positions=query_positions[:, 0],
            sliding_window=sliding_window)
        out, _ = quest_decode_attention(q, self.cache.keys, self.cache.values, self.cache.lengths,
                                        pages, count, self.page_size, **window)
        return out.reshape(queries.shape).astype(queries.dtype), self


@dataclasses.dataclass(frozen=True)
class Quest(Store):
    page_size: int = 16
    dense_layers: int = 2
    # --kv_budget is the tokens read per decode step, not an eviction budget
    capabilities = Capabilities(evicts=False, reads_segments=True, own_budget=True)

    def n_select(self, budget: Budget) -> int | None:
        """Pages read per decode step: kv_budget // page_size; None (all) without a budget."""
        if budget.tokens is None:
            if budget.ratio:
                raise UserError("quest reads a fixed number of tokens per step: give --kv_budget "
                                "(a multiple of the page size), not --compression_ratio")
            return None
        if budget.tokens < self.page_size:
            raise UserError(f"quest's --kv_budget ({budget.tokens}) must be at least the page "
                            f"size ({self.page_size} tokens)")
        return budget.tokens // self.page_size

    def check_budget(self, budget: Budget) -> None:
        self.n_select(budget)

    def check_compatible(self, first: Compressor) -> None:
        if first.capabilities.evicts:
            raise UserError("quest keeps every token and selects pages at each decode step; use it "
                            "alone (--compress=quest), not after an eviction method")

    def convert_layer(self, index: int, layer: SegmentedCache, config: ModelConfig,
                      budget: Budget):
        if index < self.dense_layers:
            return layer
        return self.convert(layer, config, budget)

    def convert(self, layer: SegmentedCache, config: ModelConfig, budget: Budget) -> QuestCache:
        """One paged cache holding the context and room for what follows it (question, answer)."""
        context, recent = layer.context, layer.recent
        batch, kv_heads, _, head_dim = context.keys.shape
        capacity = round_up(context.capacity + recent.capacity, self.page_size)
        cache = DenseKVCache.empty(batch, kv_heads, capacity, head_dim, context.keys.dtype)
        width = context.capacity
        cache = DenseKVCache(keys=cache.keys.at[:, :, :width].set(context.keys),
                             values=cache.values.at[:, :, :width].set(context.values),
                             positions=cache.positions.at[:, :, :width].set(context.positions),
                             lengths=context.lengths)
        return QuestCache.from_cache(cache, self.page_size, self.n_select(budget))
