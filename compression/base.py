"""The compressor protocol: every compression method is one `Compressor`.

A compressor maps a KV state to a KV state (kvpress's `BasePress.compress`). It receives the
state as the context's prefill left it (every layer a `DenseKVCache` holding the whole context),
or as an earlier compressor left it in a chain; what it observed during the prefill (`needs`,
gathered by `compression.observations.ObservingCache`); its own parameters (a pytree, traced
through jit, `None` for training-free methods); and `Budgets`, the per-batch budgets worked out
on the host. It returns the state with each layer's cache rebuilt: smaller, quantized, paged,
or wrapped in a cache that acts at every decode step. The whole state passes through
`compress`, so a method may read neighbouring layers (cross-layer merging) or the tokens it
discards (merging methods) before it drops them; `capabilities` declares what it does, and
nothing probes for methods.

`Scorer` is the common specialisation (kvpress's `ScorerPress`): score each cached token, keep
each stream's budget of the best. `Store` converts the kept context into another cache kind
(quantized, paged). `Chain(first, then)` is the one way to compose (`snapkv+kivi2`).

Budgets follow kvpress: `compression_ratio` r is the fraction of the context removed and each
(layer, kv-head) keeps `max(1, int(n * (1 - r)))` of n context tokens; `kv_budget` N keeps
`min(N, n)` instead.
"""

import dataclasses

import jax
import jax.numpy as jnp

from compression.observations import LayerObservations, Needs
from compression.select import keep_best
from models.config import ModelConfig
from models.kv_cache import DenseKVCache, KVState
from pallas_kernels.errors import UserError

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
class Capabilities:
    """What a compressor does, declared (composition and the CLIs read these, never probe)."""

    evicts: bool = True  # keeps a budget of the context's tokens (False: keeps every token)
    head_wise: bool = False  # the heads of a layer keep different numbers of tokens (AdaKV)
    decode_scoring: bool = False  # can score the cache at each decode step (decode eviction)
    decode_step: bool = False  # acts at every decode step
    own_budget: bool = False  # the budget is the method's own (Quest: tokens read per step)
    reads_segments: bool = False  # converts a kept context segment (stores: quantized, paged)
    neighbouring_layers: bool = False  # reads other layers' caches (cross-layer merging)
    discarded_tokens: bool = False  # reads the tokens it discards (merging methods)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Budgets:
    """One batch's budgets for `Compressor.compress`: arrays traced, sizes static.

    `segmented`: the kept context must stay a segment of its own (`SegmentedCache`), because a
    compressor later in a chain converts it; otherwise uniform budgets share one cache with the
    tokens to come."""

    context_lengths: jax.Array  # [batch] int32, tokens of each context
    n_kept: jax.Array  # [layers, batch] int32, tokens kept per (layer, kv-head) stream
    floors: jax.Array  # [layers, batch] int32, head-wise methods: tokens each head keeps at least
    capacities: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    recent_capacity: int = dataclasses.field(metadata=dict(static=True))
    budget: Budget = dataclasses.field(metadata=dict(static=True))
    segmented: bool = dataclasses.field(default=False, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Compressor:
    """Base of every compression method (see the module docstring). Frozen and hashable: the
    compressor is a static argument of jitted code; its learned weights are `params`."""

    capabilities = Capabilities()

    def needs(self) -> Needs:
        """What to observe while the context is prefilled."""
        return Needs()

    def init_params(self, config: ModelConfig, key: jax.Array):
        """The compressor's learned parameters (a pytree), or None."""
        return None

    def check_budget(self, budget: Budget) -> None:
        """Raises UserError when this compressor cannot work to `budget`."""

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        """Tokens each (layer, kv-head) stream keeps of a context of n tokens."""
        return [budget.n_kept(n)] * num_layers

    def floor(self, n_kept: int) -> int:
        """Head-wise methods: tokens each head keeps at least of a layer's n_kept per head."""
        return 0

    def compress(self, state: KVState, observations: tuple[LayerObservations, ...] | None,
                 budgets: Budgets, params, config: ModelConfig) -> KVState:
        """The state with every layer compressed; traced under jit (`compression.compress`).

        `state.layers[i]` is layer i's whole cache, so a method may read any layer while
        building another: a cross-layer method (`Capabilities(neighbouring_layers=True)`,
        MiniCache-like) keeps layer i's tokens by layer i-1's scores or merges the two layers'
        keys and values. A merging method (`discarded_tokens=True`, CaM-like) still holds the
        full cache after `select.keep_best` has chosen: the tokens discarded are the valid slots
        whose positions the kept cache does not hold, and their values can be folded into the
        kept ones. `params` is this compressor's `init_params` pytree (in a `Chain`, a (first,
        then) tuple), traced, so new values reuse the compiled program. See
        tests/test_compressor_protocol.py for one double of each."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Scorer(Compressor):
    """Score each cached token (higher keeps), keep each stream's budget of the best
    (`compression.select.keep_best` does the keeping, for every scorer)."""

    def score(self, observations: LayerObservations, cache: DenseKVCache,
              context_lengths: jax.Array, config: ModelConfig) -> jax.Array:
        """[batch, kv_heads, slots] float32; higher keeps; FORCED for tokens always kept."""
        raise NotImplementedError

    def compress(self, state, observations, budgets, params, config):
        layers = tuple(
            keep_best(self.capabilities.head_wise, i, cache, self.score(None if observations is None else observations[i],
                                                 cache, budgets.context_lengths, config),
                      budgets)
            for i, cache in enumerate(state.layers))
        return KVState(layers=layers, next_positions=state.next_positions)


@dataclasses.dataclass(frozen=True)
class KeepAll(Scorer):
    """No eviction: every context token stays (used when only a store acts, e.g. `kivi4`)."""

    capabilities = Capabilities(evicts=False)

    def check_budget(self, budget: Budget) -> None:
        if budget.tokens is not None or budget.ratio:
            raise UserError("a store alone keeps every context token, so --compression_ratio and "
                            "--kv_budget would be ignored; drop them or name an eviction method "
                            "first (e.g. snapkv+kivi4)")

    def score(self, observations, cache, context_lengths, config):
        return jnp.zeros(cache.positions.shape, jnp.float32)

    def layer_budgets(self, budget: Budget, n: int, num_layers: int) -> list[int]:
        return [n] * num_layers


@dataclasses.dataclass(frozen=True)
class Store(Compressor):
    """Converts each layer's kept context (a `SegmentedCache`: compressed context + empty recent
    segment) into the store's own cache kind, e.g. quantized (KIVI, int8) or paged with per-page
    metadata for sparse reads (Quest). Runs after a scorer in a `Chain`."""

    capabilities = Capabilities(evicts=False, reads_segments=True)

    def convert(self, layer, config: ModelConfig, budget: Budget):
        raise NotImplementedError

    def convert_layer(self, index: int, layer, config: ModelConfig, budget: Budget):
        """`convert` for layer `index`; a store that treats some layers differently (Quest keeps
        its first layers dense) overrides this."""
        return self.convert(layer, config, budget)

    def check_compatible(self, first: Compressor) -> None:
        """Raises UserError when this store cannot hold what `first` keeps."""

    def compress(self, state, observations, budgets, params, config):
        return KVState(layers=tuple(self.convert_layer(i, layer, config, budgets.budget)
                                    for i, layer in enumerate(state.layers)),
                       next_positions=state.next_positions)


@dataclasses.dataclass(frozen=True)
class Chain(Compressor):
    """`first`, then `then` on what it kept: the one way compressors compose. The first
    compressor's budgets and observations hold; `then` reads the kept context as a segment."""

    first: Compressor
    then: Compressor

    def __post_init__(self):
        if not self.then.capabilities.reads_segments:
            raise UserError(f"{type(self.then).__name__} cannot follow another method; "
                            "only a store (kivi2, kivi4, int8, int4, quest) can")
        self.then.check_compatible(self.first)

    @property
    def capabilities(self) -> Capabilities:
        first, then = self.first.capabilities, self.then.capabilities
        return dataclasses.replace(
            first, own_budget=first.own_budget or then.own_budget,
            decode_step=first.decode_step or then.decode_step,
            neighbouring_layers=first.neighbouring_layers or then.neighbouring_layers,
            discarded_tokens=first.discarded_tokens or then.discarded_tokens)

    def needs(self) -> Needs:
        return self.first.needs().union(self.then.needs())

    def init_params(self, config, key):
        first_key, then_key = jax.random.split(key)
        return (self.first.init_params(config, first_key), self.then.init_params(config, then_key))

    def check_budget(self, budget: Budget) -> None:
        if not self.then.capabilities.own_budget:  # else the budget is `then`'s alone (Quest)
            self.first.check_budget(budget)
        self.then.check_budget(budget)

    def layer_budgets(self, budget, n, num_layers):
        return self.first.layer_budgets(budget, n, num_layers)

    def floor(self, n_kept: int) -> int:
        return self.first.floor(n_kept)

    def compress(self, state, observations, budgets, params, config):
        first_params, then_params = params if params is not None else (None, None)
        kept = self.first.compress(state, observations, dataclasses.replace(budgets,
                                                                            segmented=True),
                                   first_params, config)
        return self.then.compress(kept, observations, budgets, then_params, config)


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
