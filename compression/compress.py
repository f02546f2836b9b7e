"""Compressing prefilled contexts: a compressor with its budget (`Compression`), the budgets of
one batch worked out on the host (`Plan`), and the jitted call of `Compressor.compress`.

Budgets come from the true context lengths (padding never counts); the arrays are sized to the
largest budget in the batch, rounded up to `select.BLOCK` slots (head-wise methods: a page pool
for the worst split of a layer's tokens over its heads, `select.pool_slots`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compression.base import Budget, Budgets, Compressor
from compression.select import capacity_for, pool_slots
from models.config import ModelConfig
from models.kv_cache import KVState


@dataclasses.dataclass(frozen=True)
class Compression:
    """A compressor, the budget it works to (`--compress` and its ratio or token budget) and
    its learned parameters (a pytree, or None)."""

    compressor: Compressor
    budget: Budget
    params: object = None

    def __post_init__(self):
        self.compressor.check_budget(self.budget)


@dataclasses.dataclass(frozen=True)
class Plan:
    n_kept: np.ndarray  # [layers, batch] tokens kept per (layer, kv-head) stream
    floors: np.ndarray  # [layers, batch] head-wise methods: tokens each head keeps at least
    capacities: tuple[int, ...]  # slots of each layer's context segment (head-wise: its pool)

    @classmethod
    def make(cls, compression: Compression, context_lengths: list[int], num_layers: int,
             kv_heads: int) -> "Plan":
        compressor, budget = compression.compressor, compression.budget
        n_kept = np.array([compressor.layer_budgets(budget, n, num_layers)
                           for n in context_lengths], np.int32).T
        n_kept = np.minimum(n_kept, np.array(context_lengths, np.int32)[None, :])
        floors = np.vectorize(compressor.floor, otypes=[np.int32])(n_kept)
        if compressor.capabilities.head_wise:  # a page pool, see `select.keep_per_layer`
            capacities = tuple(pool_slots(kv_heads, int(row.max())) for row in n_kept)
        else:
            capacities = tuple(capacity_for(int(row.max())) for row in n_kept)
        if compressor.capabilities.decode_step and budget.tokens is not None:
            # one spare slot takes each new token before eviction
            capacities = (capacity_for(budget.tokens + 1),) * num_layers
        return cls(n_kept, floors, capacities)

    def rows(self, rows: slice) -> "Plan":
        """The plan of some of the batch's rows, with the whole batch's capacities."""
        return Plan(self.n_kept[:, rows], self.floors[:, rows], self.capacities)

    def budgets(self, budget: Budget, context_lengths: list[int],
                recent_capacity: int) -> Budgets:
        """The arrays `Compressor.compress` takes; `recent_capacity` slots stay free for the
        question and the generated tokens."""
        return Budgets(jnp.asarray(context_lengths, jnp.int32), jnp.asarray(self.n_kept),
                       jnp.asarray(self.floors), self.capacities, recent_capacity, budget)


@functools.partial(jax.jit, static_argnames=("compressor", "config"))
def compress(compressor: Compressor, config: ModelConfig, kv_state: KVState, observations,
             budgets: Budgets, params=None) -> KVState:
    """`compressor.compress` over prefilled contexts, compiled."""
    return compressor.compress(kv_state, observations, budgets, params, config)


def context_bytes(kv_state: KVState, reserved: int) -> int:
    """Bytes of the compressed context (what compression saves on): each layer's bytes less
    the `reserved` slots it holds for the tokens to come, where those are its own."""
    return sum(layer.context_nbytes(reserved) for layer in kv_state.layers)
