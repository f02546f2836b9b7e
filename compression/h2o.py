"""H2O, heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023), as kvpress 0.5.5's ObservedAttentionPress
scores it: the attention each context key received, summed over all context queries, divided by
the number of queries that could see it (n - j for the key at position j), then averaged over the
query heads of each GQA group. Nothing is forced.

The column sums of a one-piece prefill come from the Pallas kernel `pallas_kernels.column_sums`
after cuDNN's fused attention (+28% over the uncompressed prefill at 32k on an H100, against
8.2x before it), those of a chunked prefill from each chunk's attention; no N x N matrix is kept.
Deviation: kvpress rounds the divisor n - j to bfloat16; here it is exact.

The decode-time variant (`compression.decode_eviction`) follows the paper's heavy-hitter + recent
split (half of the budget each, the paper's equal-ratio setting): the most recent budget // 2
tokens are never evicted; among the others the one with the lowest accumulated attention goes.
Accumulated attention is normalised by the number of queries that saw each token, as in the
prefill score (the paper's code sums without dividing).
"""

import dataclasses

import jax.numpy as jnp

from compression.base import Capabilities, Scorer
from compression.observations import Needs


@dataclasses.dataclass(frozen=True)
class H2O(Scorer):
    capabilities = Capabilities(decode_scoring=True)

    def needs(self) -> Needs:
        return Needs(column_sums=True)

    def score(self, observations, cache, context_lengths, config):
        seen_by = (context_lengths[:, None, None] - cache.positions).astype(jnp.float32)
        return observations.column_sums / jnp.maximum(seen_by, 1.0) / config.queries_per_kv_head

    def decode_scores(self, cache, probs, attention_sums, query_positions, budget):
        now = query_positions[:, -1][:, None, None]
        seen_by = jnp.maximum(now - cache.positions + 1, 1).astype(jnp.float32)
        recent = cache.positions > now - budget // 2
        return jnp.where(recent, jnp.inf, attention_sums / seen_by)
