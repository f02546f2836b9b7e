"""Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", 2024), as kvpress 0.5.5's AdaKVPress (alpha_safeguard = 0.2) allocates:
a layer keeps kv_heads * n_kept tokens in all; each head first keeps its best
n_safe = max(1, int(n_kept * alpha)) by the inner scorer, and the remaining slots go to the best
scores of the whole layer, whichever head they belong to.

kvpress only masks the evicted keys in a full-size cache; here each head's kept tokens sit on
pages of a pool the layer's heads share, reached through a per-head page table
(`models.kv_cache.PagedKVCache`), so the memory saved is real (less than a page per head beyond
the kept tokens). Wraps any scorer:
`--compress=adakv:snapkv` (the default inner scorer is SnapKV). Layer budgets come from the inner
method, so `adakv:pyramidkv` allocates pyramid budgets across layers and Ada-KV's within each
(kvpress's AdaKVPress always uses uniform layer budgets).
"""

import dataclasses

from compression.base import Budget, Capabilities, Scorer
from compression.observations import Needs
from compression.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class AdaKV(Scorer):
    scorer: Scorer = SnapKV()
    alpha_safeguard: float = 0.2
    capabilities = Capabilities(head_wise=True)

    def needs(self) -> Needs:
        return self.scorer.needs()

    def score(self, observations, cache, context_lengths, config):
        return self.scorer.score(observations, cache, context_lengths, config)

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        return self.scorer.layer_budgets(budget, n, num_layers)

    def floor(self, n_kept: int) -> int:
        """The safeguard: each head keeps at least alpha of the layer's mean budget per head."""
        return max(1, int(n_kept * self.alpha_safeguard)) if self.alpha_safeguard > 0 else 0
