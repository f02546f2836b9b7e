"""Keeping the best-scored tokens: from a full cache and per-token scores to a smaller cache.

Top-k ties go to the lower slot (`lax.top_k`'s documented rule, which is also what torch.topk
gave on CUDA for kvpress). Kept tokens are stored in position order; kvpress stores them in score
order, which attention cannot tell apart.
"""

import jax
import jax.numpy as jnp

from models.kv_cache import EMPTY_POSITION, DenseKVCache, PagedKVCache, SegmentedCache

BLOCK = 16  # capacities are rounded up to this many slots, so few shapes get compiled
WIDE_BLOCK = 256  # and from WIDE_FROM slots up to this many (see `capacity_for`)
WIDE_FROM = 2048
PAGE = BLOCK  # tokens per page of a head-wise (paged) context


def round_up(n: int, block: int = BLOCK) -> int:
    return -(-n // block) * block


def capacity_for(n: int) -> int:
    """Cache slots for n tokens: a multiple of 16, and from 2,048 slots up a multiple of 256.
    XLA's GPU attention over a cache whose length is not a multiple of 256 takes 10-20% longer per
    decode step (H100, Llama-3.1-8B shape: 9.2 ms at 32,800 slots, 7.7 ms at 33,024;
    `python -m benchmarks.decode_breakdown --capacities=32800,33024`)."""
    return round_up(n, WIDE_BLOCK if n > WIDE_FROM else BLOCK)


def _valid_scores(cache: DenseKVCache, scores):
    slot = jnp.arange(cache.capacity, dtype=jnp.int32)
    return jnp.where(slot < cache.lengths[:, :, None], scores, -jnp.inf)


def keep_per_head(cache: DenseKVCache, scores, n_kept, capacity: int) -> DenseKVCache:
    """Each (sequence, kv-head) keeps its n_kept[b] best tokens in a cache of `capacity` slots
    (slots past n_kept stay free for tokens appended later)."""
    chosen_count = min(capacity, cache.capacity)
    _, chosen = jax.lax.top_k(_valid_scores(cache, scores), chosen_count)
    kept = jnp.arange(chosen_count)[None, None, :] < n_kept[:, None, None]
    order = jnp.sort(jnp.where(kept, chosen, cache.capacity), axis=-1)  # kept first, by slot
    order = jnp.pad(order, [(0, 0), (0, 0), (0, capacity - chosen_count)],
                    constant_values=cache.capacity)
    slots = jnp.minimum(order, cache.capacity - 1)
    take = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)
    positions = jnp.take_along_axis(cache.positions, slots, axis=2)
    return DenseKVCache(keys=take(cache.keys), values=take(cache.values),
                        positions=jnp.where(order < cache.capacity, positions, EMPTY_POSITION),
                        lengths=jnp.broadcast_to(n_kept[:, None], cache.lengths.shape))


def pool_slots(kv_heads: int, n_kept: int) -> int:
    """Pool slots of a head-wise layer whose kv_heads streams keep kv_heads * n_kept tokens in
    all, split over the heads in any way: each stream rounded up to whole pages, at worst
    sum_h ceil(k_h / PAGE) <= (kv_heads * (n_kept + PAGE - 1)) // PAGE pages, i.e. less than one
    page per stream beyond the kept tokens."""
    return PAGE * ((kv_heads * (n_kept + PAGE - 1)) // PAGE)


def keep_per_layer(cache: DenseKVCache, scores, n_kept_per_head, floor,
                   capacity: int) -> PagedKVCache:
    """The heads of a layer share kv_heads * n_kept[b] tokens: each head first keeps its floor[b]
    best tokens, the rest go to the best scores of the whole layer (head-wise budgets, AdaKV).
    The kept tokens land in a pool of `capacity` slots (`pool_slots`) of PAGE-token pages, each
    head's tokens in position order on consecutive pages, heads in order."""
    batch, kv_heads, slots = scores.shape
    scores = _valid_scores(cache, scores)
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)
    scores = jnp.where(rank < floor[:, None, None], jnp.inf, scores)
    flat = scores.reshape(batch, kv_heads * slots)
    chosen_count = min(capacity, kv_heads * slots)
    _, chosen = jax.lax.top_k(flat, chosen_count)
    total = kv_heads * n_kept_per_head
    kept = jnp.arange(chosen_count)[None, :] < total[:, None]
    order = jnp.sort(jnp.where(kept, chosen, kv_heads * slots), axis=-1)  # by (head, slot)
    heads = jnp.arange(kv_heads, dtype=jnp.int32)
    counts = (order[:, None, :] // slots == heads[None, :, None]).sum(axis=-1, dtype=jnp.int32)
    starts = jnp.cumsum(counts, axis=1) - counts  # [b, h], each head's first entry of `order`
    head_pages = -(-counts // PAGE)
    first_pages = jnp.cumsum(head_pages, axis=1) - head_pages  # [b, h], each head's first page
    pages = capacity // PAGE
    stream_pages = min(pages, -(-slots // PAGE))
    m = jnp.arange(stream_pages, dtype=jnp.int32)
    page_table = jnp.where(m < head_pages[..., None], first_pages[..., None] + m, 0)
    # each pool slot takes the entry of `order` its head's stream puts there
    pool = jnp.arange(pages * PAGE, dtype=jnp.int32)
    owner = (pool[None, :, None] // PAGE >= first_pages[:, None, :]).sum(axis=-1) - 1
    take = lambda x: jnp.take_along_axis(x, owner, axis=1)
    index = pool[None, :] - take(first_pages) * PAGE  # within the owner's stream
    filled = index < take(counts)
    entry = jnp.take_along_axis(order, jnp.minimum(take(starts) + index, chosen_count - 1),
                                axis=1)
    head, slot = jnp.minimum(entry // slots, kv_heads - 1), entry % slots
    rows = jnp.arange(batch)[:, None]
    paged = lambda x: x.reshape(batch, pages, PAGE, *x.shape[2:])
    return PagedKVCache(
        keys=paged(cache.keys[rows, head, slot]), values=paged(cache.values[rows, head, slot]),
        positions=paged(jnp.where(filled, cache.positions[rows, head, slot], EMPTY_POSITION)),
        page_table=page_table.astype(jnp.int32), lengths=counts)


def keep_best(head_wise: bool, index: int, cache: DenseKVCache, scores, budgets):
    """Layer `index` keeping its best-scored tokens within `budgets` (a `base.Budgets`): one
    cache shared with the tokens to come for uniform budgets (a decode step then runs one
    attention per layer instead of two and a merge), else the kept context as a segment of its
    own followed by an empty exact segment (head-wise budgets, or a later compressor converts
    the context)."""
    n_kept, capacity = budgets.n_kept[index], budgets.capacities[index]
    if head_wise:
        context = keep_per_layer(cache, scores, n_kept, budgets.floors[index], capacity)
    elif not budgets.segmented:
        return keep_per_head(cache, scores, n_kept,
                             capacity_for(capacity + budgets.recent_capacity))
    else:
        context = keep_per_head(cache, scores, n_kept, capacity)
    batch, kv_heads, _, head_dim = cache.keys.shape
    return SegmentedCache(context, DenseKVCache.empty(batch, kv_heads, budgets.recent_capacity,
                                                      head_dim, cache.keys.dtype))
