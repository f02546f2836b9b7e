"""The Llama decoder (Touvron et al. 2023; Llama 3, Dubey et al. 2024) as pure functions; Mistral
(Jiang et al. 2023) is the same network with sliding-window attention.

`forward` runs any number of new tokens against the KV state: a prefill chunk, a question appended
after compression, or one decode token. The KV state decides how keys and values are stored and
read; this file only computes them.
"""

import jax
import jax.numpy as jnp

from compression.observations import seen_column_sums
from models.attention import causal_self_attention
from models.kv_cache import KVState, group_queries
from models.config import ModelConfig
from models.params import LayerParams, ModelParams
from models.rope import apply_rope
from pallas_kernels.column_sums import attention_column_sums


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def project_qkv(layer: LayerParams, x, config: ModelConfig):
    """Queries [b, t, heads, d], keys and values [b, t, kv_heads, d], before RoPE."""
    batch, tokens, _ = x.shape
    qkv = (x @ layer.wqkv).reshape(batch, tokens, -1, config.head_dim)
    q, k, v = jnp.split(qkv, [config.num_heads, config.num_heads + config.num_kv_heads], axis=2)
    return q, k, v


def mlp(layer: LayerParams, x):
    gate, up = jnp.split(x @ layer.w_gate_up, 2, axis=-1)
    return (jax.nn.silu(gate) * up) @ layer.w_down


def attend(cache, q_pre, q, k, v, positions, valid, config: ModelConfig, needs=None,
           observations=None, fresh: bool = False):
    """Appends a chunk's post-RoPE keys and values to the cache and attends its queries; with
    `needs` also updates the layer's `observations` (what the compression scorers watch during
    prefill; the cache must then be a plain `DenseKVCache`). `fresh` says the cache was empty, so
    attention runs over the new tokens alone (fused). Returns (output [b, t, heads, d], cache,
    observations)."""
    cache = cache.append(k, v, positions, valid)
    if fresh:
        lengths = valid.sum(axis=1, dtype=jnp.int32)
        attn, lse = causal_self_attention(q, k, v, lengths, config.sliding_window)
        if needs is not None:
            sums = (attention_column_sums(q, k, lse, lengths, window=config.sliding_window)
                    if needs.column_sums else None)
            observations = observations.update(needs, q_pre, q, sums, positions, valid)
    elif needs is None:
        attn, cache = cache.attend(q, positions, config.sliding_window)
    else:
        out, _, probs = cache.partial(group_queries(q, config.num_kv_heads), positions,
                                      config.sliding_window)
        attn = out.astype(q.dtype)
        sums = seen_column_sums(probs, valid) if needs.column_sums else None
        observations = observations.update(needs, q_pre, q, sums, positions, valid)
    return attn, cache, observations


def decoder_layer(layer: LayerParams, cache, x, positions, valid, config: ModelConfig,
                  needs=None, observations=None, fresh: bool = False):
    """One block; `needs`, `observations` and `fresh` as in `attend`."""
    h = rms_norm(x, layer.attn_norm, config.rms_norm_eps)
    q_pre, k, v = project_qkv(layer, h, config)
    q, k = apply_rope(q_pre, positions, config), apply_rope(k, positions, config)
    attn, cache, observations = attend(cache, q_pre, q, k, v, positions, valid, config, needs,
                                       observations, fresh)
    x = x + attn.reshape(*x.shape[:2], -1) @ layer.wo
    x = x + mlp(layer, rms_norm(x, layer.mlp_norm, config.rms_norm_eps))
    return x, cache, observations


def forward(params: ModelParams, config: ModelConfig, tokens, valid, kv_state: KVState,
            needs=None, observations=None, fresh: bool = False):
    """Runs `tokens` [batch, t] (valid: [batch, t] bool, a prefix per row) after the KV state.

    Positions continue from each sequence's `next_positions`. When a compression method watches
    the prefill, `needs` says what it needs and `observations` holds one `LayerObservations` per
    layer. Returns the final-norm hidden states [batch, t, hidden], the updated KV state and the
    updated observations (None when not watching). `fresh`: the KV state is empty (a first
    prefill in one piece), so attention needs no cache reads.
    """
    positions = kv_state.next_positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = params.embed[tokens]
    caches, watched = [], []
    for i, (layer, cache) in enumerate(zip(params.layers, kv_state.layers)):
        x, cache, layer_observations = decoder_layer(
            layer, cache, x, positions, valid, config, needs,
            None if needs is None else observations[i], fresh)
        caches.append(cache)
        watched.append(layer_observations)
    x = rms_norm(x, params.final_norm, config.rms_norm_eps)
    new_state = KVState(layers=tuple(caches),
                        next_positions=kv_state.next_positions + valid.sum(1, dtype=jnp.int32))
    return x, new_state, (None if needs is None else tuple(watched))


def logits(params: ModelParams, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., vocab] of final-norm hidden states."""
    if params.lm_head is None:
        return jnp.einsum("...h,vh->...v", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", hidden, params.lm_head, preferred_element_type=jnp.float32)
