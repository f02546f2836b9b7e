"""The compressor protocol (`compression.base.Compressor`) expresses the methods issue 22 names
beyond scorers: cross-layer merging (a layer reuses its neighbour's kept cache, MiniCache-like),
merging of discarded tokens (CaM-like) and learned compressors (a parameter pytree, traced, saved
with Orbax).

Each is a small test double defined here, run through the engine's jitted
`compression.compress.compress` on a prefilled KV state built directly (3 layers, GQA with 2
kv-heads, a batch of two contexts of different lengths, the shorter padded), and checked against a
NumPy transcription of its rule in float64, one (layer, sequence, kv-head) stream at a time on the
sequence's true tokens. Inputs are random and continuous, so float32 scores rank like float64 ones.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert.orbax_store import restore_tree, save_tree
from compression.base import Budget, Capabilities, Chain, Compressor, Scorer
from compression.compress import Compression, Plan, compress
from compression.kivi import KIVI
from compression.knorm import KNorm
from compression.quantized_cache import QuantizedKVCache
from compression.select import keep_best
from models.kv_cache import EMPTY_POSITION, DenseKVCache, KVState
from tests.compression_harness import RECENT_SLOTS, tiny_config

CONFIG = tiny_config(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16)
LENGTHS = [40, 29]
CAPACITY = 48  # slots of the prefilled cache; the second context leaves 19 of them padding
BUDGET = Budget(ratio=0.5)


# ------------------------------------------------------------------------------------------------
# The doubles.

def key_norm_scores(cache: DenseKVCache):
    """KNorm's score: the lowest key norms keep."""
    return -jnp.linalg.norm(cache.keys.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class CrossLayerDouble(Compressor):
    """Cross-layer merging, after MiniCache (Liu et al., 2024) but simplified: layers are taken in
    pairs (0, 1), (2, 3), ...; the first of a pair keeps its lowest-key-norm tokens (KNorm); the
    second keeps the tokens its neighbour chose, and stores at them the average of its own keys
    and values and the neighbour's. A prefilled state holds the whole context in every layer, at
    the same slots, so the two layers' tokens line up slot for slot."""

    capabilities = Capabilities(neighbouring_layers=True)

    def compress(self, state, observations, budgets, params, config):
        layers = []
        for i, cache in enumerate(state.layers):
            neighbour = state.layers[i - i % 2]
            if i % 2:
                cache = dataclasses.replace(cache, keys=(cache.keys + neighbour.keys) / 2,
                                            values=(cache.values + neighbour.values) / 2)
            layers.append(keep_best(False, i, cache, key_norm_scores(neighbour), budgets))
        return KVState(layers=tuple(layers), next_positions=state.next_positions)


def context_of(layer):
    """The kept context of a compressed layer (a `DenseKVCache`, alone or as a segment)."""
    return getattr(layer, "context", layer)


def merge_discarded(full: DenseKVCache, layer):
    """`layer` (the kept part of `full`) with the mean of each stream's discarded values added to
    each of its kept values; a stream that discards nothing is unchanged."""
    kept = context_of(layer)
    in_use = jnp.arange(kept.capacity) < kept.lengths[:, :, None]
    kept_positions = jnp.where(in_use, kept.positions, EMPTY_POSITION)
    valid = jnp.arange(full.capacity) < full.lengths[:, :, None]
    held = (full.positions[..., :, None] == kept_positions[..., None, :]).any(axis=-1)
    discarded = (valid & ~held)[..., None]
    count = discarded.sum(axis=2)
    mean = jnp.where(discarded, full.values, 0).sum(axis=2) / jnp.maximum(count, 1)
    values = jnp.where(in_use[..., None],
                       kept.values + mean[:, :, None, :].astype(kept.values.dtype), kept.values)
    merged = dataclasses.replace(kept, values=values)
    return dataclasses.replace(layer, context=merged) if layer is not kept else merged


@dataclasses.dataclass(frozen=True)
class MergeDiscardedDouble(KNorm):
    """Merging the discarded tokens, after CaM (Zhang et al., "CaM: Cache Merging for
    Memory-efficient LLMs Inference", ICML 2024) but simplified: KNorm chooses the kept tokens;
    the values of the tokens it discards are not lost, their mean (per stream, uniform where CaM
    weighs by attention) is added to every kept value. Keys are kept as they were."""

    capabilities = Capabilities(discarded_tokens=True)

    def compress(self, state, observations, budgets, params, config):
        return KVState(
            layers=tuple(
                merge_discarded(cache, keep_best(False, i, cache, self.score(
                    None, cache, budgets.context_lengths, config), budgets))
                for i, cache in enumerate(state.layers)),
            next_positions=state.next_positions)


@dataclasses.dataclass(frozen=True)
class LearnedDouble(Scorer):
    """A learned scorer: a token's score is its key dotted with a learned vector w [head_dim]
    (`params = {"w": w}`), shared by all layers and heads.

    `Scorer.score` is not given the params, so this scorer runs `Scorer.compress`'s loop itself
    with `learned_score` in place of `score`."""

    def init_params(self, config, key):
        return {"w": jax.random.normal(key, (config.head_dim,), jnp.float32)}

    def learned_score(self, cache: DenseKVCache, params):
        return cache.keys.astype(jnp.float32) @ params["w"]

    def compress(self, state, observations, budgets, params, config):
        return KVState(layers=tuple(keep_best(False, i, cache, self.learned_score(cache, params),
                                              budgets)
                                    for i, cache in enumerate(state.layers)),
                       next_positions=state.next_positions)


# ------------------------------------------------------------------------------------------------
# The prefilled state and the engine's compression of it.

def random_prefill(seed: int = 0):
    """Per layer NumPy keys and values [batch, kv_heads, capacity, head_dim] (zero past each
    context, as a prefill leaves them; keys with two loud channels), and the `KVState` holding
    them with positions 0.. n-1 and EMPTY_POSITION past n."""
    rng = np.random.default_rng(seed)
    batch, heads, dim = len(LENGTHS), CONFIG.num_kv_heads, CONFIG.head_dim
    slot = np.arange(CAPACITY)
    valid = slot[None, None, :] < np.array(LENGTHS)[:, None, None]  # [batch, 1, capacity]
    arrays, layers = [], []
    for _ in range(CONFIG.num_layers):
        keys = rng.normal(size=(batch, heads, CAPACITY, dim)).astype(np.float32)
        keys[..., :2] *= 3.0
        values = rng.normal(size=(batch, heads, CAPACITY, dim)).astype(np.float32)
        keys, values = keys * valid[..., None], values * valid[..., None]
        arrays.append(dict(k=keys, v=values))
        positions = np.broadcast_to(np.where(valid, slot, EMPTY_POSITION), (batch, heads, CAPACITY))
        layers.append(DenseKVCache(
            keys=jnp.asarray(keys), values=jnp.asarray(values),
            positions=jnp.asarray(positions, jnp.int32),
            lengths=jnp.asarray(np.broadcast_to(np.array(LENGTHS)[:, None], (batch, heads)),
                                jnp.int32)))
    state = KVState(layers=tuple(layers), next_positions=jnp.asarray(LENGTHS, jnp.int32))
    return arrays, state


def run_engine(compression: Compression, state: KVState) -> KVState:
    plan = Plan.make(compression, LENGTHS, CONFIG.num_layers, CONFIG.num_kv_heads)
    budgets = plan.budgets(compression.budget, LENGTHS, RECENT_SLOTS)
    return compress(compression.compressor, CONFIG, state, None, budgets, compression.params)


def streams(compressed: KVState):
    """Yields (layer, sequence, kv-head, kept positions, kept keys, kept values) of every stream
    of a compressed state whose layers are `DenseKVCache`s (alone or as a segment)."""
    for i, layer in enumerate(compressed.layers):
        kept = context_of(layer)
        positions, lengths = np.asarray(kept.positions), np.asarray(kept.lengths)
        keys, values = np.asarray(kept.keys), np.asarray(kept.values)
        for b in range(len(LENGTHS)):
            for h in range(CONFIG.num_kv_heads):
                n = lengths[b, h]
                yield i, b, h, positions[b, h, :n], keys[b, h, :n], values[b, h, :n]


# ------------------------------------------------------------------------------------------------
# The references, NumPy in float64.

def n_kept(n: int) -> int:
    return max(1, int(n * (1.0 - BUDGET.ratio)))


def best(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, ties to the lower index, in index order."""
    return np.sort(np.argsort(-scores, kind="stable")[:count])


def stream(arrays, i: int, b: int, h: int):
    """Layer i's keys and values of one (sequence, kv-head) stream, true tokens only, float64."""
    n = LENGTHS[b]
    return (arrays[i]["k"][b, h, :n].astype(np.float64),
            arrays[i]["v"][b, h, :n].astype(np.float64))


def cross_layer_reference(arrays, i, b, h):
    keys, values = stream(arrays, i, b, h)
    neighbour_keys, neighbour_values = stream(arrays, i - i % 2, b, h)
    kept = best(-np.linalg.norm(neighbour_keys, axis=-1), n_kept(LENGTHS[b]))
    if i % 2:
        keys, values = (keys + neighbour_keys) / 2, (values + neighbour_values) / 2
    return kept, keys[kept], values[kept]


def merge_discarded_reference(arrays, i, b, h):
    keys, values = stream(arrays, i, b, h)
    kept = best(-np.linalg.norm(keys, axis=-1), n_kept(LENGTHS[b]))
    discarded = np.setdiff1d(np.arange(len(keys)), kept)
    merged = values[kept] + (values[discarded].mean(axis=0) if len(discarded) else 0.0)
    return kept, keys[kept], merged


def learned_reference(arrays, i, b, h, w):
    keys, values = stream(arrays, i, b, h)
    kept = best(keys @ np.asarray(w, np.float64), n_kept(LENGTHS[b]))
    return kept, keys[kept], values[kept]


def assert_matches(compressed: KVState, reference):
    """Every stream keeps the reference's positions, keys and values (float32 against float64)."""
    for i, b, h, positions, keys, values in streams(compressed):
        want_positions, want_keys, want_values = reference(i, b, h)
        where = f"layer {i}, sequence {b}, kv-head {h}"
        np.testing.assert_array_equal(positions, want_positions, err_msg=where)
        np.testing.assert_allclose(keys, want_keys, rtol=1e-6, atol=1e-6, err_msg=where)
        np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-6, err_msg=where)


# ------------------------------------------------------------------------------------------------
# The tests.

def test_cross_layer_double_keeps_its_neighbours_tokens_averaged_as_reference():
    arrays, state = random_prefill()
    compressed = run_engine(Compression(CrossLayerDouble(), BUDGET), state)
    assert_matches(compressed, lambda i, b, h: cross_layer_reference(arrays, i, b, h))
    layer_0, layer_1 = (np.asarray(context_of(layer).positions) for layer in compressed.layers[:2])
    np.testing.assert_array_equal(layer_0, layer_1)  # the odd layer reused its neighbour's choice


def test_merge_discarded_double_adds_mean_of_discarded_values_as_reference():
    arrays, state = random_prefill()
    compressed = run_engine(Compression(MergeDiscardedDouble(), BUDGET), state)
    assert_matches(compressed, lambda i, b, h: merge_discarded_reference(arrays, i, b, h))
    plain = run_engine(Compression(KNorm(), BUDGET), state)  # the same tokens, values not merged
    for merged, kept in zip(streams(compressed), streams(plain)):
        np.testing.assert_array_equal(merged[3], kept[3])
        assert not np.allclose(merged[5], kept[5])


def compiles_during(fn):
    """(fn(), the number of XLA compilations it ran), counted by `jax.monitoring`'s backend
    compile event."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return jax.block_until_ready(fn()), len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_learned_double_params_are_traced_and_choose_the_kept_tokens():
    arrays, state = random_prefill()
    method = LearnedDouble()
    first, second = (method.init_params(CONFIG, jax.random.key(seed)) for seed in (0, 1))
    compressed_first = run_engine(Compression(method, BUDGET, params=first), state)
    cached = compress._cache_size()
    compressed_second, compiles = compiles_during(
        lambda: run_engine(Compression(method, BUDGET, params=second), state))
    assert compiles == 0 and compress._cache_size() == cached  # new values, same program
    assert_matches(compressed_first, lambda i, b, h: learned_reference(arrays, i, b, h, first["w"]))
    assert_matches(compressed_second,
                   lambda i, b, h: learned_reference(arrays, i, b, h, second["w"]))
    kept = lambda compressed: [s[3].tolist() for s in streams(compressed)]
    assert kept(compressed_first) != kept(compressed_second)


def test_learned_double_params_round_trip_through_orbax(tmp_path):
    arrays, state = random_prefill()
    method = LearnedDouble()
    params = method.init_params(CONFIG, jax.random.key(2))
    save_tree(tmp_path / "learned", params)
    restored = restore_tree(tmp_path / "learned",
                            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert got.dtype == saved.dtype and got.shape == saved.shape
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                      np.asarray(saved).view(np.uint32))
    kept = [run_engine(Compression(method, BUDGET, params=p), state) for p in (params, restored)]
    for original, again in zip(streams(kept[0]), streams(kept[1])):
        np.testing.assert_array_equal(original[3], again[3])
    assert_matches(kept[1], lambda i, b, h: learned_reference(arrays, i, b, h, params["w"]))


def test_chain_passes_learned_params_to_its_first_compressor():
    arrays, state = random_prefill()
    chain = Chain(LearnedDouble(), KIVI(bits=4))
    params = chain.init_params(CONFIG, jax.random.key(3))
    assert params[1] is None and set(params[0]) == {"w"}
    compressed = run_engine(Compression(chain, BUDGET, params=params), state)
    # Every kept token (at most 20) lies within KIVI's 128-token exact residual, so the residual
    # holds the kept context as the learned scorer chose it, in position order.
    for i, layer in enumerate(compressed.layers):
        assert isinstance(layer, QuantizedKVCache)
        lengths = np.asarray(layer.lengths)
        for b in range(len(LENGTHS)):
            n = lengths[b]
            for h in range(CONFIG.num_kv_heads):
                want_positions, want_keys, want_values = learned_reference(arrays, i, b, h,
                                                                           params[0]["w"])
                np.testing.assert_array_equal(np.asarray(layer.residual_positions)[b, h, :n],
                                              want_positions)
                np.testing.assert_allclose(np.asarray(layer.residual_values)[b, h, :n],
                                           want_values, rtol=1e-6, atol=1e-6)
