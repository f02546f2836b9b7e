"""Every compression method keeps exactly the tokens its published algorithm keeps.

Each method has a NumPy transcription of kvpress 0.5.5's press (the engine's reference semantics),
written from the algorithm and computed in float64, one (layer, sequence) at a time on the
sequence's true tokens only. The engine runs its real path (chunked prefill observations, scores,
budgets, top-k, cache rebuild) through `tests.compression_harness` on a batch of two sequences of
different lengths (the shorter one padded), with GQA (8 query heads, 2 kv-heads) and 3 layers, and
must keep the same positions in every (layer, sequence, kv-head) stream.

Inputs are random and continuous, so scores only tie where a test builds the tie on purpose; the
engine's float32 scores then rank like the float64 reference. The deliberate deviations of the
engine (float32 scores, H2O's exact divisor, position-ordered storage, JAX's PRNG for `random`)
are the ones named in each method's docstring; lax.top_k's lower-index tie rule is the one kvpress
showed on CUDA, and the reference's `top_k` uses it too.
"""

import copy
import functools

import numpy as np
import pytest

from compression.adakv import AdaKV
from compression.base import Budget
from compression.compress import Compression
from compression.expected_attention import ExpectedAttention
from compression.h2o import H2O
from compression.knorm import KNorm
from compression.pyramidkv import PyramidKV
from compression.random import Random
from compression.snapkv import SnapKV
from compression.streamingllm import StreamingLLM
from compression.tova import TOVA
from models.rope import inverse_frequencies
from tests.compression_harness import engine_kept_positions, random_context, tiny_config

CONFIG = tiny_config(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16)
KV_HEADS, GROUP, HEAD_DIM = CONFIG.num_kv_heads, CONFIG.queries_per_kv_head, CONFIG.head_dim
# 100 * (1 - 0.9) = 9.999999999999998 in float64: kvpress keeps 9 tokens of the second sequence.
LENGTHS = [120, 100]
RATIOS = [0.3, 0.5, 0.75, 0.875, 0.9]
WINDOW = 8


@functools.cache
def context(seed: int = 0):
    return random_context(CONFIG, len(LENGTHS), max(LENGTHS), seed)


@functools.cache
def loud_sink_context():
    """The context with the first 4 keys 3x longer (attention sinks), so that whether the sinks
    enter ExpectedAttention's softmax changes which tokens it keeps."""
    layers = copy.deepcopy(context())
    for layer in layers:
        layer["k"][:, :4] *= 3.0
    return layers


def engine_kept(method, budget, layers=None, lengths=LENGTHS):
    return engine_kept_positions(CONFIG, Compression(method, budget), layers or context(),
                                 lengths)


# ------------------------------------------------------------------------------------------------
# The reference: kvpress 0.5.5 in NumPy, float64.

def rows(layers, lengths=LENGTHS):
    """Yields (layer, sequence, that sequence's tokens as float64 arrays: q_pre and q [n, heads,
    d], k and v [n, kv_heads, d])."""
    for i, layer in enumerate(layers):
        for b, n in enumerate(lengths):
            yield i, b, {name: x[b, :n].astype(np.float64) for name, x in layer.items()}


def kept_tokens(n: int, budget: Budget) -> float:
    """kvpress's n * (1 - r) as a Python float; a token budget N is min(N, n)."""
    return n * (1.0 - budget.ratio) if budget.ratio is not None else float(min(budget.tokens, n))


def compute_n_kept(n: int, budget: Budget) -> int:
    """kvpress.utils.compute_n_kept: max(1, int(n * (1 - r))), truncating the float64 product."""
    return max(1, int(kept_tokens(n, budget)))


def top_k(scores, k: int) -> list[int]:
    """The positions torch.topk keeps, with ties going to the lower index (kvpress on CUDA)."""
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, query_positions):
    """Causal attention of the queries at `query_positions` over all n keys, softmax over all of
    them: [heads, len(query_positions), n]. Keys are repeat_kv'd: query head h reads kv-head
    h // GROUP."""
    n = len(k)
    query_positions = np.asarray(query_positions)
    logits = np.einsum("ihd,jhd->hij", q[query_positions], np.repeat(k, GROUP, axis=1))
    causal = np.arange(n)[None, None, :] <= query_positions[None, :, None]
    return softmax(np.where(causal, logits / np.sqrt(HEAD_DIM), -np.inf))


def group_mean(per_query_head):
    """[heads, ...] -> [kv_heads, ...]: mean over the query heads of each GQA group."""
    return per_query_head.reshape(KV_HEADS, GROUP, *per_query_head.shape[1:]).mean(axis=1)


def streamingllm_scores(x, budget, n_sink):
    """StreamingLLMPress.score: ones, with zeros on [n_sink, n_sink + n_pruned) where
    n_pruned = n - int(n (1 - r)) (a bare int)."""
    n = len(x["k"])
    scores = np.ones((KV_HEADS, n))
    scores[:, n_sink:n_sink + n - int(kept_tokens(n, budget))] = 0.0
    return scores


def snapkv_scores(x, window, kernel):
    """SnapKVPress.score: the window's attention to the keys before it, mean over the window,
    avg_pool1d(kernel, stride 1, zero padding kernel // 2, padding counted), mean over each GQA
    group; the window padded with max + 1."""
    n = len(x["k"])
    probs = attention(x["q"], x["k"], range(n - window, n))[:, :, :n - window]
    mean = probs.mean(axis=1)  # [heads, n - w]
    pad = kernel // 2
    padded = np.pad(mean, [(0, 0), (pad, pad)])
    pooled = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1).sum(-1) / kernel
    scores = group_mean(pooled)
    return np.concatenate([scores, np.full((KV_HEADS, window), scores.max() + 1)], axis=1)


def pyramid_budgets(n, budget, window, beta, num_layers):
    """PyramidKVPress.get_layer_budget for every layer, and which branch gave it."""
    capacity = kept_tokens(n, budget)
    min_num = capacity / beta
    max_num = 2 * capacity - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = 2 * capacity - max_num
    if not n >= max_num >= min_num >= window:
        return [max(1, round(kept_tokens(n, budget)))] * num_layers, "fallback"
    steps = (max_num - min_num) / (num_layers - 1)
    return [round(max_num - layer * steps) for layer in range(num_layers)], "pyramid"


def h2o_scores(x, normalise=True):
    """ObservedAttentionPress.score: column sums of the full causal attention over all n
    queries, divided by n - j (the number of queries that see key j), mean over each group.
    (normalise=False is the original H2O's raw sum, only to show the divisor matters.)"""
    n = len(x["k"])
    sums = attention(x["q"], x["k"], range(n)).sum(axis=1)  # [heads, n]
    return group_mean(sums / np.arange(n, 0, -1) if normalise else sums)


def tova_scores(x):
    """TOVAPress.score: the last query's attention (softmax over all n keys), its last column
    dropped, mean over ALL query heads, the same for every kv-head; the last token max + 1."""
    n = len(x["k"])
    probs = attention(x["q"], x["k"], [n - 1])[:, 0, :n - 1]  # [heads, n - 1]
    scores = probs.mean(axis=0)
    scores = np.concatenate([scores, [scores.max() + 1]])
    return np.tile(scores, (KV_HEADS, 1))


def knorm_scores(x):
    """KnormPress.score: minus the L2 norm of each post-RoPE key."""
    return -np.linalg.norm(x["k"], axis=-1).T


@functools.cache
def averaged_rope(n, n_future):
    """The mean over positions n .. n + n_future - 1 of R_t = diag(cos_t) + diag(sin_t) P, with
    P x = rotate_half(x) = [-x2, x1]."""
    half = HEAD_DIM // 2
    rotate_half = np.zeros((HEAD_DIM, HEAD_DIM))
    rotate_half[np.arange(half), np.arange(half) + half] = -1.0
    rotate_half[np.arange(half) + half, np.arange(half)] = 1.0
    inv_freq = inverse_frequencies(CONFIG).astype(np.float64)
    angles = np.arange(n, n + n_future, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)  # [t, d]
    matrices = [np.diag(c) + np.diag(s) @ rotate_half for c, s in zip(cos, sin)]
    return np.mean(matrices, axis=0)


def expected_attention_scores(x, n_future, n_sink, *, ddof=0, statistics_from=None,
                              softmax_from=None, quadratic_divisor=2, value_norm=True):
    """ExpectedAttentionPress.score: Gaussian statistics of the pre-RoPE queries after the sinks
    (biased covariance), rotated by the averaged RoPE of the next n_future positions; expected
    logit mu'.k / sqrt(d) + k^T Sigma' k / (2 d); softmax over the non-sink keys; mean over each
    group; times the value norm; the sinks padded on the left with max + 1.

    The keyword arguments only exist to show that each of these details changes the kept set on
    the test inputs (`test_expected_attention_details_are_observable`); defaults are kvpress's."""
    n = len(x["k"])
    statistics_from = n_sink if statistics_from is None else statistics_from
    softmax_from = n_sink if softmax_from is None else softmax_from
    queries = x["q_pre"][statistics_from:]  # [N, heads, d]
    mean = queries.mean(axis=0)
    centred = queries - mean
    cov = np.einsum("thd,the->hde", centred, centred) / (len(queries) - ddof)
    rope = averaged_rope(n, n_future)
    mean = mean @ rope.T
    cov = rope @ cov @ rope.T
    keys = np.repeat(x["k"][softmax_from:], GROUP, axis=1)  # [n - sinks, heads, d]
    logits = (np.einsum("hd,jhd->hj", mean, keys) / np.sqrt(HEAD_DIM)
              + np.einsum("jhd,hde,jhe->hj", keys, cov, keys) / (quadratic_divisor * HEAD_DIM))
    scores = group_mean(softmax(logits)[:, n_sink - softmax_from:])
    if value_norm:
        scores = scores * np.linalg.norm(x["v"][n_sink:], axis=-1).T
    return np.concatenate([np.full((KV_HEADS, n_sink), scores.max() + 1), scores], axis=1)


def adakv_select(scores, n_kept, alpha):
    """AdaKVPress.compress: each head's n_safe best get finfo.max, then the
    kv_heads * (n - n_kept) smallest scores of the whole layer are evicted."""
    kv_heads, n = scores.shape
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe)
    scores = scores.copy()
    for head in range(kv_heads):
        scores[head, np.argsort(-scores[head], kind="stable")[:n_safe]] = np.finfo(np.float64).max
    evicted = np.argsort(scores.reshape(-1), kind="stable")[:kv_heads * (n - n_kept)]
    keep = np.ones(kv_heads * n, bool)
    keep[evicted] = False
    return [np.flatnonzero(row).tolist() for row in keep.reshape(kv_heads, n)]


def reference_kept(score, layers, budget, lengths=LENGTHS, layer_budgets=None):
    """[layer][sequence][kv_head] -> kept positions; `score(x)` gives [kv_heads, n] scores and
    `layer_budgets(n)` the per-layer n_kept (default: compute_n_kept in every layer)."""
    out = [[None] * len(lengths) for _ in layers]
    for i, b, x in rows(layers, lengths):
        n = len(x["k"])
        n_kept = layer_budgets(n)[i] if layer_budgets else compute_n_kept(n, budget)
        scores = score(x)
        out[i][b] = [top_k(scores[h], n_kept) for h in range(KV_HEADS)]
    return out


def assert_same_kept(engine, reference):
    for i, (engine_layer, reference_layer) in enumerate(zip(engine, reference, strict=True)):
        for b, (got, want) in enumerate(zip(engine_layer, reference_layer, strict=True)):
            for h in range(KV_HEADS):
                assert got[h] == want[h], (
                    f"layer {i}, sequence {b}, kv-head {h}: engine keeps {len(got[h])}, reference "
                    f"{len(want[h])}; only engine {sorted(set(got[h]) - set(want[h]))}, only "
                    f"reference {sorted(set(want[h]) - set(got[h]))}")


def every_stream(kept):
    return [(i, b, h, streams[h]) for i, layer in enumerate(kept)
            for b, streams in enumerate(layer) for h in range(KV_HEADS)]


BUDGETS = [Budget(ratio=r) for r in RATIOS] + [Budget(tokens=30)]
budget_id = lambda budget: f"r{budget.ratio}" if budget.ratio is not None else f"N{budget.tokens}"


# ------------------------------------------------------------------------------------------------
# Budgets.

def test_n_kept_truncates_the_float64_product_like_kvpress():
    assert Budget(ratio=0.9).n_kept(100) == 9  # 9.999999999999998
    assert Budget(ratio=0.9).n_kept(1000) == 99
    assert Budget(ratio=0.8).n_kept(1000) == 199
    assert Budget(ratio=0.9).n_kept(4096) == 409
    assert Budget(ratio=0.99).n_kept(50) == 1  # max(1, ...)
    assert Budget(tokens=64).n_kept(50) == 50
    for n in range(1, 300):
        for r in (0.1, 0.2, 0.3, 0.5, 0.7, 0.75, 0.8, 0.875, 0.9, 0.95):
            assert Budget(ratio=r).n_kept(n) == compute_n_kept(n, Budget(ratio=r))


def test_kept_counts_drop_the_token_lost_to_float_error():
    kept = engine_kept(KNorm(), Budget(ratio=0.9))
    for _, b, _, positions in every_stream(kept):
        assert len(positions) == [11, 9][b]  # 120 * 0.09999999999999998 and 100 * ...


# ------------------------------------------------------------------------------------------------
# StreamingLLM.

@pytest.mark.parametrize("budget", BUDGETS + [Budget(ratio=0.99), Budget(tokens=3)], ids=budget_id)
def test_streamingllm_keeps_sinks_and_recent_tokens_like_reference(budget):
    method = StreamingLLM(n_sink=4)
    kept = engine_kept(method, budget)
    assert_same_kept(kept, reference_kept(lambda x: streamingllm_scores(x, budget, 4),
                                          context(), budget))
    for _, b, _, positions in every_stream(kept):
        n_kept = compute_n_kept(LENGTHS[b], budget)
        # Fewer than 4 kept: the sinks tie and the lowest positions win.
        sinks = list(range(min(4, n_kept)))
        assert positions == sinks + list(range(LENGTHS[b] - n_kept + len(sinks), LENGTHS[b]))


# ------------------------------------------------------------------------------------------------
# SnapKV and PyramidKV.

# r = 0.95 keeps 6 and 5 tokens, fewer than the window: the forced window tokens tie and the
# earliest of them are kept.
@pytest.mark.parametrize("budget", BUDGETS + [Budget(ratio=0.95)], ids=budget_id)
def test_snapkv_keeps_same_tokens_as_reference(budget):
    kept = engine_kept(SnapKV(window_size=WINDOW, kernel_size=5), budget)
    assert_same_kept(kept, reference_kept(lambda x: snapkv_scores(x, WINDOW, 5), context(),
                                          budget))
    for _, b, _, positions in every_stream(kept):
        n, n_kept = LENGTHS[b], compute_n_kept(LENGTHS[b], budget)
        window = range(n - WINDOW, n - WINDOW + min(WINDOW, n_kept))
        assert set(window) <= set(positions)  # the window is forced


def test_snapkv_with_another_kernel_and_window_keeps_same_tokens_as_reference():
    budget = Budget(ratio=0.75)
    kept = engine_kept(SnapKV(window_size=4, kernel_size=7), budget)
    assert_same_kept(kept, reference_kept(lambda x: snapkv_scores(x, 4, 7), context(), budget))


# With window 8, for both n = 120 and n = 100: r = 0.1 and 0.33 cap max at n - w and
# take the pyramid (r = 0.33, n = 120: 112, 80.4, 48.8 round to 112, 80, 49; int would give 48);
# r = 0.5 takes it with min == w exactly; r = 0.75 falls back (min < w);
# r = 0.8125 falls back to round(22.5) = 22 for n = 120 (half to even) and round(18.75) = 19
# where int() gives 18; r = 0.9 falls back to round(11.999999999999998) = 12 where SnapKV keeps 11.
PYRAMID_CASES = [(Budget(ratio=0.1), ["pyramid", "pyramid"]),
                 (Budget(ratio=0.33), ["pyramid", "pyramid"]),
                 (Budget(ratio=0.5), ["pyramid", "pyramid"]),
                 (Budget(ratio=0.75), ["fallback", "fallback"]),
                 (Budget(ratio=0.8125), ["fallback", "fallback"]),
                 (Budget(ratio=0.9), ["fallback", "fallback"]),
                 (Budget(tokens=100), ["pyramid", "fallback"])]


@pytest.mark.parametrize("budget,branches", PYRAMID_CASES, ids=[budget_id(b) for b, _ in
                                                                 PYRAMID_CASES])
def test_pyramidkv_keeps_same_tokens_and_layer_budgets_as_reference(budget, branches):
    layer_budgets = lambda n: pyramid_budgets(n, budget, WINDOW, 20.0, CONFIG.num_layers)[0]
    assert [pyramid_budgets(n, budget, WINDOW, 20.0, CONFIG.num_layers)[1]
            for n in LENGTHS] == branches
    kept = engine_kept(PyramidKV(window_size=WINDOW, kernel_size=5), budget)
    assert_same_kept(kept, reference_kept(lambda x: snapkv_scores(x, WINDOW, 5), context(),
                                          budget, layer_budgets=layer_budgets))
    counts = [[len(kept[i][b][0]) for b in range(len(LENGTHS))] for i in range(CONFIG.num_layers)]
    for b, branch in enumerate(branches):
        column = [row[b] for row in counts]
        if branch == "pyramid":
            assert column == sorted(column, reverse=True) and column[0] > column[-1]
        else:
            assert len(set(column)) == 1


def test_pyramidkv_budgets_round_where_snapkv_truncates():
    assert pyramid_budgets(120, Budget(ratio=0.9), WINDOW, 20.0, 4)[0] == [12] * 4
    assert pyramid_budgets(120, Budget(ratio=0.8125), WINDOW, 20.0, 4)[0] == [22] * 4
    assert pyramid_budgets(100, Budget(ratio=0.8125), WINDOW, 20.0, 4)[0] == [19] * 4
    assert pyramid_budgets(120, Budget(ratio=0.1), WINDOW, 20.0, 4)[0] == [112, 109, 107, 104]
    assert pyramid_budgets(120, Budget(ratio=0.33), WINDOW, 20.0, 3)[0] == [112, 80, 49]
    for ratio, want in [(0.9, [12, 10]), (0.8125, [22, 19])]:
        kept = engine_kept(PyramidKV(window_size=WINDOW), Budget(ratio=ratio))
        assert [len(kept[0][b][0]) for b in range(2)] == want


# ------------------------------------------------------------------------------------------------
# H2O, TOVA, Knorm.

@pytest.mark.parametrize("budget", BUDGETS, ids=budget_id)
def test_h2o_chunked_column_sums_keep_same_tokens_as_one_shot_reference(budget):
    # The harness prefills in chunks of 16; the reference takes the full n x n attention at once.
    assert_same_kept(engine_kept(H2O(), budget), reference_kept(h2o_scores, context(), budget))


@pytest.mark.parametrize("budget", BUDGETS, ids=budget_id)
def test_h2o_one_piece_prefill_keeps_same_tokens_as_one_shot_reference(budget):
    # A fresh prefill: fused causal attention's log-sum-exp + the column-sum kernel (reference
    # off GPU) instead of chunked probabilities.
    kept = engine_kept_positions(CONFIG, Compression(H2O(), budget), context(), LENGTHS,
                                 one_piece=True)
    assert_same_kept(kept, reference_kept(h2o_scores, context(), budget))


@pytest.mark.parametrize("budget", BUDGETS, ids=budget_id)
def test_tova_keeps_same_tokens_as_reference(budget):
    kept = engine_kept(TOVA(), budget)
    assert_same_kept(kept, reference_kept(tova_scores, context(), budget))
    for i, b, h, positions in every_stream(kept):
        assert positions == kept[i][b][0]  # one selection for every kv-head
        assert LENGTHS[b] - 1 in positions  # the last token is forced


@pytest.mark.parametrize("budget", BUDGETS, ids=budget_id)
def test_knorm_keeps_same_tokens_as_reference(budget):
    assert_same_kept(engine_kept(KNorm(), budget), reference_kept(knorm_scores, context(), budget))


def test_knorm_tie_at_the_budget_boundary_goes_to_the_lower_position():
    """In every stream, the key of the last kept token is copied onto the first evicted one, so
    the two norms tie exactly at the boundary and only the tie rule decides."""
    budget = Budget(ratio=0.5)
    layers = copy.deepcopy(context())
    ties = {}
    for i, b, x in rows(layers):
        n_kept = compute_n_kept(len(x["k"]), budget)
        for h in range(KV_HEADS):
            order = np.argsort(np.linalg.norm(x["k"][:, h], axis=-1), kind="stable")
            last_kept, first_out = order[n_kept - 1], order[n_kept]
            layers[i]["k"][b, first_out, h] = layers[i]["k"][b, last_kept, h]
            ties[i, b, h] = (last_kept, first_out)
    kept = engine_kept(KNorm(), budget, layers)
    assert_same_kept(kept, reference_kept(knorm_scores, layers, budget))
    for i, b, h, positions in every_stream(kept):
        low, high = sorted(ties[i, b, h])
        assert low in positions and high not in positions


# ------------------------------------------------------------------------------------------------
# ExpectedAttention.

@pytest.mark.parametrize("budget", BUDGETS, ids=budget_id)
def test_expected_attention_keeps_same_tokens_as_reference(budget):
    kept = engine_kept(ExpectedAttention(n_future_positions=512, n_sink=4), budget,
                       loud_sink_context())
    assert_same_kept(kept, reference_kept(lambda x: expected_attention_scores(x, 512, 4),
                                          loud_sink_context(), budget))
    for _, _, _, positions in every_stream(kept):
        assert positions[:4] == [0, 1, 2, 3]  # sinks forced


def test_expected_attention_with_other_sinks_and_horizon_keeps_same_tokens_as_reference():
    budget = Budget(ratio=0.75)
    kept = engine_kept(ExpectedAttention(n_future_positions=64, n_sink=2), budget,
                       loud_sink_context())
    assert_same_kept(kept, reference_kept(lambda x: expected_attention_scores(x, 64, 2),
                                          loud_sink_context(), budget))


EXPECTED_ATTENTION_VARIANTS = {
    "unbiased covariance": dict(ddof=1),
    "sinks in the query statistics": dict(statistics_from=0),
    "sinks in the softmax": dict(softmax_from=0),
    "quadratic term over d": dict(quadratic_divisor=1),
    "no value norm": dict(value_norm=False),
    "RoPE of one future position": dict(n_future=1),
}


@pytest.mark.parametrize("variant", EXPECTED_ATTENTION_VARIANTS)
def test_expected_attention_details_are_observable(variant):
    """Each detail the reference follows changes some kept token on the inputs of the tests
    above, so an engine that got it wrong would fail them."""
    options = dict(n_future=512, n_sink=4) | EXPECTED_ATTENTION_VARIANTS[variant]
    changed = 0
    for budget in BUDGETS:
        faithful = reference_kept(lambda x: expected_attention_scores(x, 512, 4),
                                  loud_sink_context(), budget)
        other = reference_kept(lambda x: expected_attention_scores(x, **options),
                               loud_sink_context(), budget)
        changed += faithful != other
    assert changed


def test_h2o_normalisation_is_observable():
    budget = Budget(ratio=0.5)
    assert (reference_kept(h2o_scores, context(), budget)
            != reference_kept(lambda x: h2o_scores(x, normalise=False), context(), budget))


# ------------------------------------------------------------------------------------------------
# AdaKV.

def adakv_reference(score, layers, budget, alpha):
    out = [[None] * len(LENGTHS) for _ in layers]
    for i, b, x in rows(layers):
        out[i][b] = adakv_select(score(x), compute_n_kept(len(x["k"]), budget), alpha)
    return out


@pytest.mark.parametrize("budget", [Budget(ratio=r) for r in (0.3, 0.5, 0.75, 0.875)]
                         + [Budget(tokens=30)], ids=budget_id)
def test_adakv_snapkv_keeps_same_tokens_per_head_as_reference(budget):
    kept = engine_kept(AdaKV(SnapKV(window_size=WINDOW, kernel_size=5)), budget)
    assert_same_kept(kept, adakv_reference(lambda x: snapkv_scores(x, WINDOW, 5), context(),
                                           budget, 0.2))
    for i, b, _, _ in every_stream(kept):
        assert sum(map(len, kept[i][b])) == KV_HEADS * compute_n_kept(LENGTHS[b], budget)


def test_adakv_safeguard_floor_holds_a_head_the_global_ranking_would_starve():
    """kv-head 1's keys are scaled up, so under Knorm every one of its scores is below every score
    of kv-head 0: the global allocation gives it only its floor, n_safe = max(1,
    int(n_kept * alpha)), and kv-head 0 takes the rest of the layer's 2 * n_kept slots."""
    layers = copy.deepcopy(context())
    for layer in layers:
        layer["k"][:, :, 1] *= 10.0
    # r = 0.75: n_kept 30 and 25, floors 6 and 5 (alpha 0.2), 12 and 10 (alpha 0.4);
    # r = 0.97: n_kept 3 and 3, floor max(1, int(0.6)) = 1.
    for alpha, budget in [(0.2, Budget(ratio=0.75)), (0.4, Budget(ratio=0.75)),
                          (0.2, Budget(ratio=0.97))]:
        kept = engine_kept(AdaKV(KNorm(), alpha_safeguard=alpha), budget, layers)
        assert_same_kept(kept, adakv_reference(knorm_scores, layers, budget, alpha))
        for i, b, _, _ in every_stream(kept):
            n_kept = compute_n_kept(LENGTHS[b], budget)
            n_safe = max(1, int(n_kept * alpha))
            assert [len(kept[i][b][h]) for h in range(2)] == [2 * n_kept - n_safe, n_safe]


def test_adakv_expected_attention_keeps_same_tokens_per_head_as_reference():
    budget = Budget(ratio=0.5)
    kept = engine_kept(AdaKV(ExpectedAttention(n_future_positions=512, n_sink=4)), budget,
                       loud_sink_context())
    assert_same_kept(kept, adakv_reference(lambda x: expected_attention_scores(x, 512, 4),
                                           loud_sink_context(), budget, 0.2))


# ------------------------------------------------------------------------------------------------
# Random: JAX's PRNG cannot reproduce torch's stream, so only its structure is checked.

def test_random_keeps_the_same_uniform_sample_in_every_layer():
    budget = Budget(ratio=0.5)
    kept = engine_kept(Random(seed=0), budget)
    for i, b, h, positions in every_stream(kept):
        n = LENGTHS[b]
        assert positions == kept[0][b][h]  # reseeded per layer, as kvpress does
        assert len(positions) == compute_n_kept(n, budget) and positions[-1] < n
        # A uniform sample of n/2 of n positions: the first half holds n/4 of them, give or
        # take 4 standard deviations (about 11).
        assert abs(sum(p < n // 2 for p in positions) - n // 4) <= 11
    for b in range(len(LENGTHS)):
        assert kept[0][b][0] != kept[0][b][1]  # each kv-head draws its own scores
    assert engine_kept(Random(seed=1), budget)[0] != kept[0]


# ------------------------------------------------------------------------------------------------
# Nothing to remove.

ALL_METHODS = [StreamingLLM(n_sink=4), SnapKV(window_size=WINDOW), PyramidKV(window_size=WINDOW),
               H2O(), TOVA(), KNorm(), ExpectedAttention(), Random(),
               AdaKV(SnapKV(window_size=WINDOW))]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: type(m).__name__)
def test_ratio_zero_or_budget_above_context_keeps_everything(method):
    for budget in (Budget(ratio=0.0), Budget(tokens=max(LENGTHS))):  # 120 >= 120 and 100
        kept = engine_kept(method, budget)
        for _, b, _, positions in every_stream(kept):
            assert positions == list(range(LENGTHS[b])), budget
