"""The head-wise paged cache attends as a dense masked reference does, appends into its pages,
and every cache kind names the logical axes of each of its arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import NEG_INF
from models.kv_cache import (EMPTY_POSITION, DenseKVCache, KVState, PagedKVCache,
                             SegmentedCache)

BATCH, KV_HEADS, GROUP, HEAD_DIM, PAGE = 2, 2, 3, 8, 4


def random_paged(rng, lengths, pages, stream_pages):
    """A pool holding streams of the given [batch][kv_head] lengths on shuffled pages (of the
    pool's first pages, as the cache requires), with the
    streams' tokens (positions sorted, keys, values) for the reference."""
    cache = PagedKVCache.empty(BATCH, KV_HEADS, pages, PAGE, stream_pages, HEAD_DIM, jnp.float32)
    keys, values = np.asarray(cache.keys).copy(), np.asarray(cache.values).copy()
    positions, table = np.asarray(cache.positions).copy(), np.asarray(cache.page_table).copy()
    streams = {}
    for b in range(BATCH):
        free = rng.permutation(sum(-(-n // PAGE) for n in lengths[b]))  # in use: a prefix
        for h in range(KV_HEADS):
            n = lengths[b][h]
            used, free = free[:-(-n // PAGE)], free[-(-n // PAGE):]
            table[b, h, :len(used)] = used
            k = rng.normal(size=(n, HEAD_DIM)).astype(np.float32)
            v = rng.normal(size=(n, HEAD_DIM)).astype(np.float32)
            pos = np.sort(rng.choice(100, n, replace=False)).astype(np.int32)
            for i in range(n):
                page, row = used[i // PAGE], i % PAGE
                keys[b, page, row], values[b, page, row] = k[i], v[i]
                positions[b, page, row] = pos[i]
            streams[b, h] = (k, v, pos)
    cache = PagedKVCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
                         jnp.asarray(table), jnp.asarray(lengths, jnp.int32))
    return cache, streams


def dense_twin(cache: PagedKVCache, capacity: int) -> DenseKVCache:
    """A dense cache holding the same streams as a paged one."""
    lengths, table = np.asarray(cache.lengths), np.asarray(cache.page_table)
    dense = DenseKVCache.empty(BATCH, KV_HEADS, capacity, HEAD_DIM, jnp.float32)
    arrays = [np.asarray(x).copy() for x in (dense.keys, dense.values, dense.positions)]
    for b in range(BATCH):
        for h in range(KV_HEADS):
            n = lengths[b, h]
            rows = table[b, h, :-(-n // PAGE)]
            for out, pool in zip(arrays, (cache.keys, cache.values, cache.positions)):
                pool = np.asarray(pool)[b, rows]
                out[b, h, :n] = pool.reshape(-1, *pool.shape[2:])[:n]
    return DenseKVCache(*map(jnp.asarray, arrays), cache.lengths)


def reference_attention(queries, query_positions, streams, sliding_window):
    """Dense masked softmax per (sequence, kv-head) stream in NumPy: output [b, t, h, g, d],
    log-sum-exp [b, t, h, g], and which queries see anything [b, t, h]."""
    batch, tokens = query_positions.shape
    out = np.zeros(queries.shape, np.float64)
    lse = np.full(queries.shape[:4], -np.inf)
    for b in range(batch):
        for h in range(KV_HEADS):
            k, v, pos = streams[b, h]
            for t in range(tokens):
                q = query_positions[b, t]
                visible = (pos <= q) & ((q - pos < sliding_window) if sliding_window else True)
                if not visible.any():
                    continue
                scores = queries[b, t, h] @ k[visible].T / np.sqrt(HEAD_DIM)  # [g, n]
                top = scores.max(axis=-1, keepdims=True)
                weights = np.exp(scores - top)
                lse[b, t, h] = np.log(weights.sum(axis=-1)) + top[:, 0]
                out[b, t, h] = weights / weights.sum(axis=-1, keepdims=True) @ v[visible]
    return out, lse, np.isfinite(lse[..., 0])


@pytest.mark.parametrize("sliding_window", [None, 40])
def test_paged_attention_equals_dense_masked_reference(sliding_window):
    rng = np.random.default_rng(0)
    lengths = [[3, 29], [17, 8]]  # ragged per head, partly filled last pages
    cache, streams = random_paged(rng, lengths, pages=14, stream_pages=8)
    queries = rng.normal(size=(BATCH, 5, KV_HEADS, GROUP, HEAD_DIM)).astype(np.float32)
    query_positions = np.array([[99, 80, 50, 20, 5], [99, 98, 60, 30, 0]], np.int32)
    out, lse, _ = cache.partial(jnp.asarray(queries), jnp.asarray(query_positions),
                                sliding_window)
    ref_out, ref_lse, seen = reference_attention(queries, query_positions, streams,
                                                 sliding_window)
    assert seen.sum() > seen.size // 2
    np.testing.assert_allclose(np.asarray(out)[seen], ref_out[seen], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse)[seen], ref_lse[seen], rtol=1e-5, atol=1e-5)
    assert (np.asarray(lse)[~seen] < NEG_INF / 2).all()


def test_paged_append_fills_last_pages_then_free_pages_like_a_dense_cache():
    rng = np.random.default_rng(1)
    cache, _ = random_paged(rng, [[3, 5], [4, 1]], pages=8, stream_pages=4)
    dense = dense_twin(cache, capacity=16)
    for tokens, valid_counts in ((6, [6, 2]), (3, [3, 3])):
        start = int(np.asarray(dense.positions).max()) + 1
        keys = jnp.asarray(rng.normal(size=(BATCH, tokens, KV_HEADS, HEAD_DIM)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(BATCH, tokens, KV_HEADS, HEAD_DIM)), jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(start, start + tokens, dtype=jnp.int32),
                                     (BATCH, tokens))
        valid = jnp.arange(tokens)[None, :] < jnp.asarray(valid_counts)[:, None]
        cache = cache.append(keys, values, positions, valid)
        dense = dense.append(keys, values, positions, valid)
    np.testing.assert_array_equal(cache.lengths, dense.lengths)
    used = np.asarray(cache.pages_used()).sum(axis=1)
    owners = np.asarray(cache.page_owners())
    assert all((owners[b, :used[b]] >= 0).all() and (owners[b, used[b]:] == -1).all()
               for b in range(BATCH))  # the pages in use stay a prefix of the pool
    queries = jnp.asarray(rng.normal(size=(BATCH, 2, KV_HEADS * GROUP, HEAD_DIM)), jnp.float32)
    query_positions = jnp.asarray([[200, 120], [200, 101]], jnp.int32)
    paged_out, _ = SegmentedCache(cache, DenseKVCache.empty(BATCH, KV_HEADS, 4, HEAD_DIM,
                                                           jnp.float32)).attend(
        queries, query_positions)
    dense_out, _ = dense.attend(queries, query_positions)
    np.testing.assert_allclose(paged_out, dense_out, rtol=1e-5, atol=1e-5)


def test_paged_append_drops_what_the_pool_cannot_hold():
    cache = PagedKVCache.empty(1, KV_HEADS, 3, PAGE, 3, HEAD_DIM, jnp.float32)
    tokens = 2 * PAGE  # each head wants two pages, the pool has three
    keys = jnp.ones((1, tokens, KV_HEADS, HEAD_DIM), jnp.float32)
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]
    cache = cache.append(keys, keys, positions, jnp.ones((1, tokens), bool))
    np.testing.assert_array_equal(cache.lengths, [[2 * PAGE, PAGE]])
    np.testing.assert_array_equal(cache.page_owners(), [[0, 0, 1]])
    assert (np.asarray(cache.positions) != EMPTY_POSITION).all()


def test_every_cache_array_has_one_logical_axis_name_per_dimension():
    dense = DenseKVCache.empty(BATCH, KV_HEADS, 16, HEAD_DIM, jnp.float32)
    paged = PagedKVCache.empty(BATCH, KV_HEADS, 6, PAGE, 3, HEAD_DIM, jnp.float32)
    state = KVState(layers=(dense, SegmentedCache(paged, dense)),
                    next_positions=jnp.zeros((BATCH,), jnp.int32))
    sizes = {"batch": BATCH, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "slots": 16,
             "pages": 6, "page": PAGE, "stream_pages": 3}

    def check(x, axes):
        assert len(axes) == x.ndim and all(isinstance(a, str) for a in axes)
        assert tuple(sizes[a] for a in axes) == x.shape

    jax.tree.map(check, state, state.logical_axes())
    assert len(jax.tree.leaves(state)) == 4 + 5 + 4 + 1
