"""The compression protocol.

A method is a small frozen dataclass (hashable, so jitted code takes it as a static argument) that
says what it needs to observe during the context's prefill (`needs`), how it scores each cached
token once the context is in (`score`, higher keeps) and how many tokens each layer keeps
(`layer_budgets`). The framework (`compression.compress`) does the rest: masking padding, the
top-k, and building caches that really are smaller. Methods that act at each decode step or inside
attention extend this with their own cache kinds.

Budgets follow kvpress: `compression_ratio` r is the fraction of the context removed and each
(layer, kv-head) keeps `max(1, int(n * (1 - r)))` of n context tokens; `kv_budget` N keeps
`min(N, n)` instead.
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.observations import LayerObservations, Needs
from pallas_kernels.errors import UserError
from models.kv_cache import DenseKVCache
from models.config import ModelConfig

# Score of a token a method always keeps (sinks, the observation window): above any real score,
# finite so that AdaKV's safeguard (+inf) still ranks above it, as in kvpress.
FORCED = 1e30


@dataclasses.dataclass(frozen=True)
class Budget:
    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise UserError("give exactly one of --compression_ratio and --kv_budget")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise UserError(f"compression ratio must be in [0, 1), got {self.ratio}")
        if self.tokens is not None and self.tokens <= 0:
            raise UserError(f"kv budget must be a positive number of tokens, got {self.tokens}")

    def kept(self, n: int) -> float:
        """The (fractional) number of tokens a stream should keep of n: kvpress's n * (1 - r)."""
        return n * (1.0 - self.ratio) if self.ratio is not None else float(min(self.tokens, n))

    def n_kept(self, n: int) -> int:
        return max(1, int(self.kept(n)))


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of the prefill-time (scorer) methods."""

    head_wise = False  # True: heads of a layer share the layer's budget unevenly (AdaKV)

    def needs(self) -> Needs:
        return Needs()

    def score(self, observations: LayerObservations, cache: DenseKVCache,
              context_lengths: jax.Array, config: ModelConfig) -> jax.Array:
        """[batch, kv_heads, slots] float32; higher keeps; FORCED for tokens always kept."""
        raise NotImplementedError

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        return [budget.n_kept(n)] * num_layers


@dataclasses.dataclass(frozen=True)
class KeepAll(Method):
    """No eviction: every context token stays (used when only a store acts, e.g. `kivi4`)."""

    def score(self, observations, cache, context_lengths, config):
        return jnp.zeros(cache.positions.shape, jnp.float32)

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        return [n] * num_layers


@dataclasses.dataclass(frozen=True)
class Store:
    """How the kept context is stored and read: e.g. quantized (KIVI, int8) or paged with
    per-page metadata for sparse reads (Quest). `convert` turns one layer's `SegmentedCache`
    (compressed context + empty recent segment) into the store's own cache kind, which must
    implement `append`, `attend` and `nbytes` like the caches in `models.kv_cache`."""

    uses_budget = False  # True: the budget is the store's own (Quest's tokens read per step)

    def convert(self, layer, config: ModelConfig, budget: Budget):
        raise NotImplementedError

    def convert_layer(self, index: int, layer, config: ModelConfig, budget: Budget):
        """`convert` for layer `index`; a store that treats some layers differently (Quest keeps
        its first layers dense) overrides this."""
        return self.convert(layer, config, budget)

    def check_compatible(self, method: Method) -> None:
        """Raises UserError when this store cannot hold what `method` keeps."""


def window_attention(observations: LayerObservations, cache: DenseKVCache, config: ModelConfig,
                     window: int):
    """Attention of the last `window` context queries over the whole context (keys of the
    window included, causal inside it, softmax in float32): [batch, kv_heads, group, window,
    slots], with rows of unfilled window entries zeroed (contexts shorter than the window).
    A sliding-window model (Mistral) scores only what its queries can see; kvpress ignores the
    model's sliding window here."""
    queries = observations.window_queries[:, -window:]
    query_positions = observations.window_positions[:, -window:]
    batch, _, heads, head_dim = queries.shape
    grouped = queries.reshape(batch, window, config.num_kv_heads, heads // config.num_kv_heads,
                              head_dim)
    logits = jnp.einsum("bwhgd,bhsd->bhgws", grouped, cache.keys.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(head_dim))
    mask = cache.visibility(query_positions, config.sliding_window)[:, :, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    filled = (query_positions >= 0)[:, None, None, :, None]
    return jnp.where(filled, probs, 0.0)
