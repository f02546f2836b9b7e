"""Key-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024), as kvpress 0.5.5's KnormPress: keep the keys with the lowest L2 norm
(post-RoPE, computed in float32). Nothing is forced."""

import dataclasses

import jax.numpy as jnp

from compression.base import Scorer


@dataclasses.dataclass(frozen=True)
class KNorm(Scorer):

    def score(self, observations, cache, context_lengths, config):
        return -jnp.linalg.norm(cache.keys.astype(jnp.float32), axis=-1)
