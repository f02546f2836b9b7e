"""H2O, heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023), as kvpress 0.5.5's ObservedAttentionPress
scores it: the attention each context key received, summed over all context queries, divided by
the number of queries that could see it (n - j for the key at position j), then averaged over the
query heads of each GQA group. Nothing is forced.

The column sums come from the prefill's own attention, chunk by chunk (no N x N matrix is kept).
Deviation: kvpress rounds the divisor n - j to bfloat16; here it is exact.

The decode-time variant (`compression.decode_eviction`) follows the paper: scores accumulate the
attention of every new query; once the cache is full, the lowest-scoring token outside the most
recent `recent` ones is evicted.
"""

import dataclasses

import jax.numpy as jnp

from compression.base import Method
from compression.observations import Needs


@dataclasses.dataclass(frozen=True)
class H2O(Method):

    def needs(self) -> Needs:
        return Needs(column_sums=True)

    def score(self, observations, cache, context_lengths, config):
        seen_by = (context_lengths[:, None, None] - cache.positions).astype(jnp.float32)
        return observations.column_sums / jnp.maximum(seen_by, 1.0) / config.queries_per_kv_head
