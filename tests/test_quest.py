"""Quest: page metadata, page scores and the selected pages equal a NumPy transcription of Quest's
algorithm; the Pallas kernels equal their references; with a budget that covers the whole cache,
generation equals the uncompressed engine's.

The NumPy transcription follows Quest's kernel version (the newest page always selected and
counted in the budget) with this engine's GQA rule: a kv-head's pages are chosen by the max of
its query heads' bounds. Kernels run in Pallas interpret mode on a CPU and compiled on a GPU.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from compression.base import Budget, Chain, KeepAll
from compression.compress import Compression
from compression.quest import Quest, QuestCache
from compression.registry import make_compression
from pallas_kernels.errors import UserError
from engine.generation import generate
from models.kv_cache import DenseKVCache, SegmentedCache
from pallas_kernels.quest_attention import quest_decode_attention
from pallas_kernels.quest_reference import page_metadata, quest_decode_attention_reference
from pallas_kernels.quest_select import quest_select, quest_select_with_scores
from tests.hf_reference import converted, tiny_hf_model

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
KERNEL = dict(implementation="pallas_gpu", interpret=not ON_GPU)
S = 16  # page size


# ----------------------------------------------------------------------------- NumPy transcription


def np_pages(keys, length):
    """Quest's page metadata of one stream: (min, max) per page in use, [n_pages, D] float64."""
    n_pages = -(-length // S)
    k = np.asarray(keys, np.float64)[:length]
    lo = np.stack([k[p * S:(p + 1) * S].min(axis=0) for p in range(n_pages)])
    hi = np.stack([k[p * S:(p + 1) * S].max(axis=0) for p in range(n_pages)])
    return lo, hi


def np_select(q_group, keys, length, n_select):
    """(aggregated scores [n_pages], selected pages ascending) of one kv-head stream.

    q_group [G, D]: the query heads of the kv-head. Score per query head and page:
    sum_i max(q_i * min_i, q_i * max_i); the group takes the max; the newest page is always
    kept and counts in the budget; ties go to the lower page."""
    lo, hi = np_pages(keys, length)
    q = np.asarray(q_group, np.float64)
    bound = np.maximum(q[:, None] * lo[None], q[:, None] * hi[None]).sum(-1)  # [G, P]
    scores = bound.max(axis=0)
    newest = len(scores) - 1
    others = [p for p in np.argsort(-scores, kind="stable") if p != newest]
    chosen = [newest] + others[:max(0, n_select - 1)]
    return scores, sorted(chosen)


def np_attention(q, keys, values, slots):
    """Softmax attention of one query head over the given slots, float64: (out, lse)."""
    k = np.asarray(keys, np.float64)[slots]
    s = k @ np.asarray(q, np.float64) / np.sqrt(k.shape[-1])
    p = np.exp(s - s.max())
    return p @ np.asarray(values, np.float64)[slots] / p.sum(), s.max() + np.log(p.sum())


def page_slots(pages, length):
    return [t for p in pages for t in range(p * S, min((p + 1) * S, length))]


# ----------------------------------------------------------------------------- random inputs


def random_inputs(seed, b=2, hkv=2, group=4, d=32, t=256, lengths=(200, 37), dtype=jnp.float32):
    r = np.random.default_rng(seed)
    keys = r.normal(size=(b, hkv, t, d)).astype(np.float32)
    keys[..., :3] *= 4.0  # a few loud channels, as post-RoPE keys have
    values = r.normal(size=(b, hkv, t, d)).astype(np.float32)
    q = r.normal(size=(b, hkv * group, d)).astype(np.float32)
    lengths = np.repeat(np.asarray(lengths, np.int32)[:, None], hkv, axis=1)
    cast = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # what the engine sees
    return cast(q), cast(keys), cast(values), lengths


def as_jax(dtype, *arrays):
    return [jnp.asarray(x, dtype) for x in arrays]


# ----------------------------------------------------------------------------- metadata


def test_page_metadata_follows_appends_like_numpy():
    rng = np.random.default_rng(0)
    b, h, d, context_lengths = 2, 2, 16, [37, 50]  # both end inside a page
    keys = rng.normal(size=(b, h, 64, d)).astype(np.float32)
    positions = np.where(np.arange(64) < np.array(context_lengths)[:, None, None],
                         np.arange(64), -1).astype(np.int32)
    context = DenseKVCache(jnp.asarray(keys), jnp.asarray(keys), jnp.asarray(positions),
                           jnp.asarray(np.repeat(np.array(context_lengths)[:, None], h, 1),
                                       jnp.int32))
    recent = DenseKVCache.empty(b, h, 48, d, jnp.float32)
    cache = Quest().convert(SegmentedCache(context, recent), None, Budget(tokens=64))
    streams = [[list(keys[i, j, :context_lengths[i]]) for j in range(h)] for i in range(b)]
    next_pos = np.array(context_lengths)
    for tokens, valid_counts in ((7, [7, 3]), (1, [0, 1]), (20, [20, 12])):
        new = rng.normal(size=(b, tokens, h, d)).astype(np.float32)
        valid = np.arange(tokens)[None] < np.array(valid_counts)[:, None]
        cache = cache.append(jnp.asarray(new), jnp.asarray(new),
                             jnp.asarray(next_pos[:, None] + np.arange(tokens), jnp.int32),
                             jnp.asarray(valid))
        for i in range(b):
            for j in range(h):
                streams[i][j] += list(new[i, :valid_counts[i], j])
        next_pos += valid_counts
    n_pages = cache.page_min.shape[2]
    for i in range(b):
        for j in range(h):
            length = len(streams[i][j])
            assert int(cache.cache.lengths[i, j]) == length
            lo, hi = np_pages(np.array(streams[i][j]), length)
            np.testing.assert_array_equal(cache.page_min[i, j, :len(lo)], lo)
            np.testing.assert_array_equal(cache.page_max[i, j, :len(hi)], hi)
            assert np.all(np.isposinf(cache.page_min[i, j, len(lo):n_pages]))
            assert np.all(np.isneginf(cache.page_max[i, j, len(hi):n_pages]))
    expected_bytes = sum(x.nbytes for x in (cache.cache.keys, cache.cache.values,
                                            cache.cache.positions, cache.cache.lengths,
                                            cache.page_min, cache.page_max))
    assert cache.nbytes() == expected_bytes


# ----------------------------------------------------------------------------- scores and selection


@pytest.mark.parametrize("dtype,n_select", [(jnp.float32, 3), (jnp.float32, 40),
                                            (jnp.bfloat16, 5)])
def test_scores_and_selected_pages_match_numpy_quest(dtype, n_select):
    group = 4
    q, keys, _, lengths = random_inputs(1 + n_select, group=group, dtype=dtype)
    jq, jk = as_jax(dtype, q, keys)
    page_min, page_max = page_metadata(jk, jnp.asarray(lengths), S)
    for options in (dict(implementation="reference"), KERNEL):
        scores, pages, count = quest_select_with_scores(jq, page_min, page_max,
                                                        jnp.asarray(lengths), S, n_select,
                                                        **options)
        for i in range(q.shape[0]):
            for j in range(keys.shape[1]):
                length = int(lengths[i, j])
                expected_scores, expected_pages = np_select(
                    q[i, j * group:(j + 1) * group], keys[i, j], length, n_select)
                n_pages = len(expected_scores)
                got = np.asarray(scores[i, j])
                np.testing.assert_allclose(got[:n_pages - 1], expected_scores[:-1], rtol=1e-5,
                                           atol=1e-4)
                assert np.isposinf(got[n_pages - 1]) and np.all(np.isneginf(got[n_pages:]))
                kept = int(count[i, j])
                assert kept == len(expected_pages) == min(n_select, n_pages)
                assert np.asarray(pages[i, j, :kept]).tolist() == expected_pages
                assert np.all(np.asarray(pages[i, j, kept:]) == expected_pages[-1])


def test_selection_breaks_ties_towards_the_lower_page():
    keys = np.zeros((1, 1, 128, 16), np.float32)
    keys[0, 0, :, 0] = np.repeat([1.0, 2.0, 2.0, 1.0, 2.0, 0.5, 2.0, 0.1], S)
    q = np.zeros((1, 2, 16), np.float32)
    q[0, :, 0] = [1.0, 0.5]
    lengths = jnp.asarray([[120]], jnp.int32)  # page 7 is the newest
    page_min, page_max = page_metadata(jnp.asarray(keys), lengths, S)
    for options in (dict(implementation="reference"), KERNEL):
        pages, count = quest_select(jnp.asarray(q), page_min, page_max, lengths, S, 3, **options)
        assert int(count[0, 0]) == 3 and np.asarray(pages[0, 0]).tolist() == [1, 2, 7]


# ----------------------------------------------------------------------------- sparse attention


def random_selection(seed, lengths, n_select, hkv):
    """Random distinct pages in use per stream (ascending, newest included), count and padding
    like `quest_select`."""
    r = np.random.default_rng(seed)
    pages = np.zeros((len(lengths), hkv, n_select), np.int32)
    count = np.zeros((len(lengths), hkv), np.int32)
    for i, length in enumerate(lengths):
        n_pages = -(-length // S)
        for j in range(hkv):
            k = min(n_select, n_pages)
            chosen = sorted(r.choice(n_pages - 1, k - 1, replace=False).tolist() + [n_pages - 1])
            pages[i, j] = chosen + [chosen[-1]] * (n_select - k)
            count[i, j] = k
    return pages, count


@pytest.mark.parametrize("dtype,n_select,group", [(jnp.float32, 5, 4), (jnp.bfloat16, 6, 8),
                                                  (jnp.float32, 20, 1)])
def test_sparse_attention_kernels_match_reference_and_numpy(dtype, n_select, group):
    q, keys, values, lengths = random_inputs(7 + n_select, group=group, dtype=dtype)
    pages, count = random_selection(n_select, lengths[:, 0], n_select, keys.shape[1])
    args = (*as_jax(dtype, q, keys, values), jnp.asarray(lengths), jnp.asarray(pages),
            jnp.asarray(count), S)
    ref_out, ref_lse = quest_decode_attention(*args, implementation="reference")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            j = h // group
            slots = page_slots(pages[i, j, :count[i, j]], int(lengths[i, j]))
            out, lse = np_attention(q[i, h], keys[i, j], values[i, j], slots)
            np.testing.assert_allclose(ref_out[i, h], out, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ref_lse[i, h], lse, rtol=1e-5)
    variants = [KERNEL]
    if n_select == 6:  # one case for the tuning options and for the TPU kernel
        variants.append(dict(KERNEL, pages_per_block=2, num_splits=3))
        if not ON_GPU:
            variants.append(dict(implementation="pallas_tpu", interpret=True))
    for options in variants:
        out, lse = quest_decode_attention(*args, **options)
        err = np.linalg.norm(np.asarray(out) - ref_out) / np.linalg.norm(ref_out)
        assert err < tol, options
        np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=1e-3)


def test_dispatchers_use_the_reference_off_gpu():
    q, keys, values, lengths = random_inputs(3)
    jq, jk, jv = as_jax(jnp.float32, q, keys, values)
    page_min, page_max = page_metadata(jk, jnp.asarray(lengths), S)
    pages, count = quest_select(jq, page_min, page_max, jnp.asarray(lengths), S, 4)
    out, _ = quest_decode_attention(jq, jk, jv, jnp.asarray(lengths), pages, count, S)
    ref, _ = quest_decode_attention_reference(jq, jk, jv, jnp.asarray(lengths), pages, count, S)
    if not ON_GPU:
        np.testing.assert_array_equal(out, ref)
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


# ----------------------------------------------------------------------------- the engine's cache


def test_quest_cache_attends_to_the_selected_pages_at_decode():
    q, keys, values, lengths = random_inputs(11, t=224, lengths=(200, 37))
    b, hkv, _, d = keys.shape
    positions = np.where(np.arange(224) < lengths[..., None], np.arange(224), -1).astype(np.int32)
    context = DenseKVCache(*as_jax(jnp.float32, keys, values), jnp.asarray(positions),
                           jnp.asarray(lengths))
    recent = DenseKVCache.empty(b, hkv, 16, d, jnp.float32)
    cache = Quest().convert(SegmentedCache(context, recent), None, Budget(tokens=4 * S))
    new_k = np.random.default_rng(12).normal(size=(b, 1, hkv, d)).astype(np.float32)
    cache = cache.append(jnp.asarray(new_k), jnp.asarray(new_k),
                         jnp.asarray(lengths[:, :1]), jnp.ones((b, 1), bool))
    out, _ = cache.attend(jnp.asarray(q[:, None]), jnp.asarray(lengths[:, :1]))
    group = q.shape[1] // hkv
    for i in range(b):
        for j in range(hkv):
            length = int(lengths[i, j]) + 1
            stream_k = np.concatenate([keys[i, j, :length - 1], new_k[i, :, j]])
            stream_v = np.concatenate([values[i, j, :length - 1], new_k[i, :, j]])
            _, chosen = np_select(q[i, j * group:(j + 1) * group], stream_k, length, 4)
            for h in range(j * group, (j + 1) * group):
                expected, _ = np_attention(q[i, h], stream_k, stream_v, page_slots(chosen, length))
                np.testing.assert_allclose(out[i, 0, h], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return converted(tiny_hf_model("llama"))


def test_quest_with_a_budget_covering_the_cache_generates_like_uncompressed(tiny):
    config, params = tiny
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (45, 70)]
    questions = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 3)]
    with jax.default_matmul_precision("highest"):  # the same float32 products on every backend
        full, every_layer, tight = quest_generations(params, config, prompts, questions)
    assert every_layer.tokens == full.tokens
    assert all(isinstance(layer, QuestCache) for layer in every_layer.kv_state.layers)
    first, second = tight.kv_state.layers
    assert isinstance(first, SegmentedCache) and isinstance(second, QuestCache)
    assert second.n_select == 2
    metadata = second.page_min.nbytes + second.page_max.nbytes
    assert second.nbytes() == second.cache.nbytes() + metadata > 0


def quest_generations(params, config, prompts, questions):
    """Uncompressed; Quest on every layer with a budget covering the cache; Quest with 2 pages on
    the second layer."""
    full = generate(params, config, prompts, 12, questions=questions)
    budget = Budget(tokens=96)  # >= 70 + 5 + 12 tokens: every page is read
    every_layer = generate(params, config, prompts, 12, questions=questions,
                           compression=Compression(Chain(KeepAll(), Quest(dense_layers=0)), budget))
    tight = generate(params, config, prompts, 12, questions=questions,
                     compression=Compression(Chain(KeepAll(), Quest(dense_layers=1)),
                                             Budget(tokens=2 * S)))
    return full, every_layer, tight


def test_quest_reports_what_to_change():
    with pytest.raises(UserError, match="alone"):
        make_compression("snapkv+quest", Budget(tokens=64))
    with pytest.raises(UserError, match="--kv_budget"):
        Quest().n_select(Budget(ratio=0.5))
    with pytest.raises(UserError, match="page size"):
        Quest().n_select(Budget(tokens=8))
    assert Quest().n_select(Budget(tokens=100)) == 6 and Quest().n_select(Budget(ratio=0.0)) is None
    assert isinstance(make_compression("quest", None).compressor.then, Quest)
    assert Quest.capabilities.own_budget  # engine.evaluate runs quest once per --kv_budgets entry


def test_quest_keeps_the_first_two_layers_dense():
    store = make_compression("quest", Budget(tokens=64)).compressor.then
    context = DenseKVCache.empty(1, 2, 32, 16, jnp.float32)
    layer = SegmentedCache(context, DenseKVCache.empty(1, 2, 16, 16, jnp.float32))
    kinds = [type(store.convert_layer(i, layer, None, Budget(tokens=64))) for i in range(4)]
    assert kinds == [SegmentedCache, SegmentedCache, QuestCache, QuestCache]
