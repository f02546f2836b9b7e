"""Expected Attention (Devoto et al., "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", 2025), as kvpress 0.5.5's ExpectedAttentionPress
(n_future_positions = 512, n_sink = 4, use_covariance, use_vnorm, epsilon = 0):

1. future queries are modelled as Gaussian: mean mu and (biased, 1/N) covariance Sigma of the
   pre-RoPE queries of all context tokens after the 4 sinks, per query head;
2. RoPE is averaged over the next 512 positions n .. n + 511: R = mean_t R_t, mu' = R mu,
   Sigma' = R Sigma R^T;
3. expected logit of key k: z = mu'.k / sqrt(d) + k^T Sigma' k / (2 d);
4. softmax of z over the non-sink keys, mean over each GQA group, times the value norm;
5. the sinks are always kept.

Deviation: computed in float32 (kvpress's softmax runs in the model dtype).
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.base import FORCED, Scorer
from compression.observations import Needs
from models.rope import inverse_frequencies


def averaged_rope_matrix(config, context_lengths, n_future: int):
    """[batch, d, d]: the mean of the rotate-half RoPE matrices of positions n .. n + n_future - 1."""
    positions = context_lengths[:, None] + jnp.arange(n_future)  # [b, t]
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(config))
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1).mean(axis=1)  # [b, d]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1).mean(axis=1)
    half = config.head_dim // 2
    # rotate_half(x) = P x with P[i, i + half] = -1 and P[i + half, i] = 1.
    rotate_half = jnp.zeros((config.head_dim, config.head_dim))
    rotate_half = rotate_half.at[jnp.arange(half), jnp.arange(half) + half].set(-1.0)
    rotate_half = rotate_half.at[jnp.arange(half) + half, jnp.arange(half)].set(1.0)
    return jax.vmap(lambda c, s: jnp.diag(c) + jnp.diag(s) @ rotate_half)(cos, sin)


@dataclasses.dataclass(frozen=True)
class ExpectedAttention(Scorer):
    n_future_positions: int = 512
    n_sink: int = 4

    def needs(self) -> Needs:
        return Needs(query_statistics_after=self.n_sink)

    def score(self, observations, cache, context_lengths, config):
        count = jnp.maximum(observations.query_count, 1.0)[:, None, None]
        mean = observations.query_sum / count  # [b, heads, d]
        cov = observations.query_outer / count[..., None] - jnp.einsum("bhd,bhe->bhde", mean, mean)
        rope = averaged_rope_matrix(config, context_lengths, self.n_future_positions)
        mean = jnp.einsum("bde,bhe->bhd", rope, mean)
        cov = jnp.einsum("bde,bhef,bgf->bhdg", rope, cov, rope)
        batch, heads, d = mean.shape
        group = heads // config.num_kv_heads
        keys = cache.keys.astype(jnp.float32)  # [b, kv, slots, d]
        mean = mean.reshape(batch, config.num_kv_heads, group, d)
        cov = cov.reshape(batch, config.num_kv_heads, group, d, d)
        logits = (jnp.einsum("bhgd,bhsd->bhgs", mean, keys) / jnp.sqrt(jnp.float32(d))
                  + jnp.einsum("bhsd,bhgde,bhse->bhgs", keys, cov, keys) / (2 * d))
        slot = jnp.arange(cache.capacity)
        scored = (slot < cache.lengths[:, :, None]) & (cache.positions >= self.n_sink)
        probs = jax.nn.softmax(jnp.where(scored[:, :, None], logits, -jnp.inf), axis=-1)
        value_norm = jnp.linalg.norm(cache.values.astype(jnp.float32), axis=-1)
        scores = jnp.nan_to_num(probs.mean(axis=2)) * value_norm
        return jnp.where(cache.positions < self.n_sink, FORCED, scores)
