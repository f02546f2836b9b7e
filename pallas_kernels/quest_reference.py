"""Plain-JAX reference for Quest's decode step (Tang et al., "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference", ICML 2024); it is the documentation of the kernels in
`quest_select.py` and `quest_attention.py`.

The cache of one layer is kept in pages of `page_size` consecutive slots. Per page and kv-head
Quest keeps the element-wise minimum m and maximum M of the page's post-RoPE keys. One decode step:

1. Score (`page_scores_reference`): each query head's upper bound on any key's dot product in
   the page, sum_i max(q_i * m_i, q_i * M_i), in float32 and without 1/sqrt(D) (Quest's kernel
   and its simulation both leave it out; it does not change the order). The query heads of a GQA
   group are aggregated by their **max**: a page's bound is the largest bound of any head of the
   group, so it stays an upper bound on every head's largest logit in the page (Quest itself is
   MHA-only; its simulation lets each query head pick its own pages).
2. Select (`select_pages_reference`): the page holding the newest token always counts (score
   +inf; Quest's kernel version, where the budget includes that page); pages past it do not
   exist (-inf). The `n_select` best pages are kept, ties to the lower page (lax.top_k), stored in
   ascending page order; entries past `count = min(n_select, pages in use)` repeat the last kept
   page, so a pipelined kernel fetches nothing new for them.
3. Attend (`quest_decode_attention_reference`): exact softmax attention of the query over the
   valid slots of the selected pages only. Returns this segment's normalised output and its
   log-sum-exp (float32), like `quantized_decode_attention_reference`.

Shapes: q [B, Hq, D]; keys, values [B, Hkv, T, D] with T a multiple of page_size; page_min,
page_max [B, Hkv, T // page_size, D]; lengths [B, Hkv] int32 (valid slots per stream: slots
[0, length) are filled, so pages [0, ceil(length / page_size)) are in use). Grouped-query
attention: query head i reads kv-head i // (Hq // Hkv); K/V are never repeated per query head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST


def pages_in_use(lengths, page_size: int):
    """Pages holding at least one valid slot: ceil(length / page_size)."""
    return (lengths + page_size - 1) // page_size


def page_metadata(keys, lengths, page_size: int):
    """(min, max) [B, Hkv, T // page_size, D] of each page's valid keys, in the keys' dtype.

    A page without valid slots holds +inf (min) and -inf (max), so that appending tokens later is
    an element-wise min / max (`jnp.ndarray.at[...].min`) that needs no special first write.
    """
    b, h, t, d = keys.shape
    if t % page_size:
        raise UserError(f"cache slots ({t}) must be a multiple of the page size ({page_size})")
    valid = (jnp.arange(t) < lengths[..., None])[..., None]
    inf = jnp.asarray(jnp.inf, keys.dtype)
    paged = lambda x: x.reshape(b, h, t // page_size, page_size, d)
    return (paged(jnp.where(valid, keys, inf)).min(axis=3),
            paged(jnp.where(valid, keys, -inf)).max(axis=3))


def page_scores_reference(q, page_min, page_max, lengths, page_size: int):
    """float32 [B, Hkv, P]: Quest's bound per page (max over the GQA group), +inf for the page of
    the newest token, -inf for pages not in use."""
    b, hq, d = q.shape
    hkv, n_pages = page_min.shape[1], page_min.shape[2]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, 1, d)
    lo = page_min.astype(jnp.float32)[:, :, None]
    hi = page_max.astype(jnp.float32)[:, :, None]
    in_use = jnp.arange(n_pages) < pages_in_use(lengths, page_size)[..., None]
    # Pages not in use hold +-inf metadata: keep them out of the products (0 * inf = nan).
    lo = jnp.where(in_use[:, :, None, :, None], lo, 0.0)
    hi = jnp.where(in_use[:, :, None, :, None], hi, 0.0)
    bound = jnp.sum(jnp.maximum(qg * lo, qg * hi), axis=-1)  # [B, Hkv, G, P]
    scores = jnp.max(bound, axis=2)
    newest = jnp.arange(n_pages) == pages_in_use(lengths, page_size)[..., None] - 1
    return jnp.where(newest, jnp.inf, jnp.where(in_use, scores, -jnp.inf))


def select_pages_reference(scores, n_select: int):
    """(pages int32 [B, Hkv, n_select] ascending, count int32 [B, Hkv]): the n_select best pages
    with a score above -inf, ties to the lower page; entries past count repeat the last kept
    page (page 0 when none is kept)."""
    n_pages = scores.shape[-1]
    k = min(n_select, n_pages)
    top, chosen = jax.lax.top_k(scores, k)
    kept = top > -jnp.inf
    count = kept.sum(axis=-1, dtype=jnp.int32)
    order = jnp.sort(jnp.where(kept, chosen, n_pages), axis=-1)  # kept first, ascending
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    entry = jnp.arange(n_select)
    padded = jnp.pad(order, [(0, 0), (0, 0), (0, n_select - k)])
    pages = jnp.where(entry < count[..., None], padded, last)
    return pages.astype(jnp.int32), count


def quest_select_reference(q, page_min, page_max, lengths, page_size: int, n_select: int):
    """Scores and selection in one: (pages, count) as `select_pages_reference`."""
    return select_pages_reference(page_scores_reference(q, page_min, page_max, lengths, page_size),
                                  n_select)


def selected_slots(pages, count, lengths, page_size: int):
    """(slots int32 [B, Hkv, n_select * page_size], valid bool of the same shape): the cache slots
    of the selected pages and which of them hold a token to attend to."""
    offset = jnp.arange(page_size, dtype=jnp.int32)
    slots = (pages[..., None] * page_size + offset).reshape(*pages.shape[:2], -1)
    entry = jnp.repeat(jnp.arange(pages.shape[-1]), page_size)
    valid = (entry < count[..., None]) & (slots < lengths[..., None])
    return slots, valid


def quest_decode_attention_reference(q, keys, values, lengths, pages, count, page_size: int, *,
                                     sm_scale: float | None = None, key_positions=None,
                                     query_positions=None, sliding_window: int | None = None):
    """Decode attention of q [B, Hq, D] over the selected pages of one cache.

    Args:
      keys, values: [B, Hkv, T, D]; lengths: [B, Hkv]; pages, count: from `select_pages_reference`.
      key_positions [B, Hkv, T], query_positions [B], sliding_window: optional sliding-window
        mask (a key more than `sliding_window - 1` positions back is not seen).
    Returns:
      out float32 [B, Hq, D], normalised over the attended slots (0 where none);
      lse float32 [B, Hq], log-sum-exp of the scaled scores (-inf where none).
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    slots, valid = selected_slots(pages, count, lengths, page_size)
    take = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)
    k, v = take(keys).astype(jnp.float32), take(values).astype(jnp.float32)
    if sliding_window is not None:
        key_pos = jnp.take_along_axis(key_positions, slots, axis=2)
        valid &= query_positions[:, None, None] - key_pos < sliding_window
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d) * scale
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, precision=_HIGHEST)
    s = jnp.where(valid[:, :, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhgt,bhtd->bhgd", p, jnp.where(valid[..., None], v, 0.0), precision=_HIGHEST)
    ok = l > 0
    safe = jnp.where(ok, l, 1.0)
    out = jnp.where(ok[..., None], o / safe[..., None], 0.0)
    lse = jnp.where(ok, m + jnp.log(safe), -jnp.inf)
    return out.reshape(b, hq, d), lse.reshape(b, hq)
