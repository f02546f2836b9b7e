"""TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024): keep the tokens the last query
attends to most, averaged over all heads, as kvpress 0.5.5's TOVAPress computes it: the last
context query's attention over all context keys (softmax in float32 over all of them), mean over
every query head of the layer (so all kv-heads keep the same tokens), the last token always kept.

The decode-time variant (`compression.decode_eviction`) follows the paper: at each step, once the
cache is full, the token with the lowest head-averaged attention of the current query is evicted
(the current token included, not forced).
"""

import dataclasses

import jax.numpy as jnp

from compression.base import Capabilities, FORCED, Scorer, window_attention
from compression.observations import Needs


@dataclasses.dataclass(frozen=True)
class TOVA(Scorer):
    capabilities = Capabilities(decode_scoring=True)

    def needs(self) -> Needs:
        return Needs(window=1)

    def score(self, observations, cache, context_lengths, config):
        probs = window_attention(observations, cache, config, 1)[:, :, :, 0]  # [b, h, g, slots]
        averaged = jnp.broadcast_to(probs.mean(axis=(1, 2))[:, None], cache.positions.shape)
        last = cache.positions == (context_lengths - 1)[:, None, None]
        return jnp.where(last, FORCED, averaged)

    def decode_scores(self, cache, probs, attention_sums, query_positions, budget):
        """The current query's attention (probs [b, h, g, 1, slots]) averaged over all heads."""
        return jnp.broadcast_to(probs[:, :, :, -1].mean(axis=(1, 2))[:, None],
                                cache.positions.shape)
