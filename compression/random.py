"""Random eviction, the baseline of kvpress 0.5.5's RandomPress: uniform random scores from a
fixed seed, drawn afresh with the same seed in every layer (so every layer keeps the same slots,
as kvpress's per-call reseeding does). Scores are float32 here (kvpress draws them in the model
dtype)."""

import dataclasses

import jax

from compression.base import Scorer


@dataclasses.dataclass(frozen=True)
class Random(Scorer):
    seed: int = 0

    def score(self, observations, cache, context_lengths, config):
        return jax.random.uniform(jax.random.key(self.seed), cache.positions.shape)
