"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR
2024): keep the first `n_sink` tokens (attention sinks) and the most recent ones.

As a prefill method it follows kvpress 0.5.5's StreamingLLMPress (n_sink = 4): of n context tokens
keep the 4 sinks and the last n_kept - 4. Kept keys keep their original RoPE positions (kvpress
without KeyRerotationPress); the paper re-rotates to cache positions. The decode-time variant
(`compression.decode_eviction`) evicts the oldest non-sink token once the cache is full.
"""

import dataclasses

import jax.numpy as jnp

from compression.base import Capabilities, FORCED, Scorer


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Scorer):
    capabilities = Capabilities(decode_scoring=True)
    n_sink: int = 4

    def score(self, observations, cache, context_lengths, config):
        recency = cache.positions.astype(jnp.float32)
        return jnp.where(cache.positions < self.n_sink, FORCED, recency)

    def decode_scores(self, cache, probs, attention_sums, query_positions, budget):
        """Decode-time eviction: the oldest token after the sinks goes first."""
        return self.score(None, cache, None, None)
