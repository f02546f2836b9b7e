"""SnapKV (Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation", NeurIPS
2024), as kvpress 0.5.5's SnapKVPress computes it (window_size = 64, kernel_size = 5):

1. the last w context queries attend to all n context keys (softmax over all of them, causal
   inside the window); only the columns of the n - w keys before the window are kept;
2. mean over the w window queries;
3. 1-D average pooling with kernel 5, stride 1, zero padding 2 (the padding counts in the mean);
4. mean over the query heads of each GQA group;
5. the w window tokens are always kept, inside the budget.

Deviation: scores are computed in float32 throughout (kvpress keeps logits and pooling in the model
dtype and only the softmax in float32).
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.base import FORCED, Scorer, window_attention
from compression.observations import Needs


def avg_pool_same(x, kernel: int):
    """PyTorch avg_pool1d(kernel, stride=1, padding=kernel // 2, count_include_pad=True) on the
    last axis."""
    pad = kernel // 2
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel,),
                                 (1,) * x.ndim, "VALID") / kernel


def window_scores(observations, cache, context_lengths, config, window: int, kernel_size: int):
    """Steps 1-4 above, with the window tokens (and anything past the context) scored 0."""
    probs = window_attention(observations, cache, config, window)  # [b, h, g, w, slots]
    filled = (observations.window_positions[:, -window:] >= 0).sum(axis=1)  # per row
    attention = probs.sum(axis=3) / filled[:, None, None, None]
    before_window = cache.positions < (context_lengths - filled)[:, None, None]
    attention = jnp.where(before_window[:, :, None, :], attention, 0.0)
    return avg_pool_same(attention, kernel_size).mean(axis=2), before_window


@dataclasses.dataclass(frozen=True)
class SnapKV(Scorer):
    window_size: int = 64
    kernel_size: int = 5

    def needs(self) -> Needs:
        return Needs(window=self.window_size)

    def score(self, observations, cache, context_lengths, config):
        scores, before_window = window_scores(observations, cache, context_lengths, config,
                                              self.window_size, self.kernel_size)
        return jnp.where(before_window, scores, FORCED)
