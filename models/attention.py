"""Attention over one cache segment, and the log-sum-exp merge of several segments.

A cache can be made of parts (a compressed context, an exact recent window, a quantized block):
each part returns its softmax-normalised output together with the log-sum-exp of its scores, and
`merge` combines them exactly as one softmax over the union would (DESIGN.md, decision 4).
"""

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def segment_attention(queries, keys, values, mask):
    """Softmax attention of grouped queries over one segment.

    queries: [batch, tokens, kv_heads, group, head_dim]; keys, values: [batch, kv_heads, slots,
    head_dim], or [batch, slots, head_dim] for a slot axis shared by all kv-heads (the mask then
    says which slots each head owns); mask: [batch, kv_heads, tokens, slots] bool. Returns the normalised output
    [batch, tokens, kv_heads, group, head_dim] float32, the log-sum-exp [batch, tokens, kv_heads,
    group] float32 (very negative where nothing is visible) and the probabilities
    [batch, kv_heads, group, tokens, slots] float32 for scorers that need them.
    """
    head_dim = queries.shape[-1]
    kv = "bhsd" if keys.ndim == 4 else "bsd"
    scores = jnp.einsum(f"bthgd,{kv}->bhgts", queries, keys,
                        preferred_element_type=jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum(f"bhgts,{kv}->bthgd", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out, lse.transpose(0, 3, 1, 2), probs


def merge(parts):
    """Combines (output, lse) pairs of disjoint segments into one normalised output."""
    lses = jnp.stack([lse for _, lse in parts])
    total = jax.nn.logsumexp(lses, axis=0)
    weights = jnp.exp(lses - total)
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def causal_self_attention(queries, keys, values, lengths, sliding_window: int | None = None):
    """Causal attention of a prompt's tokens over themselves (a prefill from an empty cache):
    queries [b, t, heads, d], keys and values [b, t, kv_heads, d], lengths [b] valid tokens.

    On GPU with 16-bit inputs this is cuDNN's fused flash attention (no t x t scores in memory);
    elsewhere XLA's. Returns the output [b, t, heads, d] (padding queries, past `lengths`, come
    out as zeros) and each query's log-sum-exp of its scaled scores [b, t, heads] float32 (what
    the column-sum kernel uses to turn scores into probabilities).
    """
    fused = jax.default_backend() == "gpu" and queries.dtype in (jnp.bfloat16, jnp.float16)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        queries, keys, values, is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, local_window_size=window,
        implementation="cudnn" if fused else None, return_residual=True)
