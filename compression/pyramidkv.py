"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", 2024), as kvpress 0.5.5's PyramidKVPress: SnapKV's scores (window 64, kernel 5) with
budgets that shrink linearly from the first layer to the last (beta = 20).

With C = n * (1 - r) the mean budget, w the window and L layers:
min = C / beta, max = 2C - min; if max >= n - w then max = n - w and min = 2C - max.
If not n >= max >= min >= w the budget falls back to uniform `max(1, round(C))` (kvpress uses
`round` there, half to even, where SnapKV truncates). Otherwise layer l keeps
`round(max - l * (max - min) / (L - 1))`. Budgets include the window.
"""

import dataclasses

from compression.base import Budget
from compression.snapkv import SnapKV


def pyramid_budgets(mean_kept: float, n: int, window: int, beta: float,
                    num_layers: int) -> list[int]:
    low = mean_kept / beta
    high = 2 * mean_kept - low
    if high >= n - window:
        high = n - window
        low = 2 * mean_kept - high
    if not n >= high >= low >= window:
        return [max(1, round(mean_kept))] * num_layers
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return [round(high - layer * step) for layer in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: float = 20.0

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        return pyramid_budgets(budget.kept(n), n, self.window_size, self.beta, num_layers)
