"""The Llama decoder (Touvron et al. 2023; Llama 3, Dubey et al. 2024) as pure functions; Mistral
(Jiang et al. 2023) is the same network with sliding-window attention.

`forward` runs any number of new tokens against the KV state: a prefill chunk, a question appended
after compression, or one decode token. The KV state decides how keys and values are stored and
read; this file only computes them.
"""

import jax
import jax.numpy as jnp

from models.kv_cache import KVState
from models.config import ModelConfig
from models.params import LayerParams, ModelParams
from models.rope import apply_rope


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


def attend(cache, q, k, v, positions, valid, config: ModelConfig):
    """Appends a chunk's post-RoPE keys and values to one layer's cache (a `KVCache`) and
    attends its queries. Returns (output [b, t, heads, d], cache)."""
    cache = cache.append(k, v, positions, valid)
    return cache.attend(q, positions, config.sliding_window)


def decoder_layer(layer: LayerParams, cache, x, positions, valid, config: ModelConfig):
    """One block: attention (through the cache) and the MLP, each with a residual."""
    h = rms_norm(x, layer.attn_norm, config.rms_norm_eps)
    q, k, v = project_qkv(layer, h, config)
    q, k = apply_rope(q, positions, config), apply_rope(k, positions, config)
    attn, cache = attend(cache, q, k, v, positions, valid, config)
    x = x + attn.reshape(*x.shape[:2], -1) @ layer.wo
    x = x + mlp(layer, rms_norm(x, layer.mlp_norm, config.rms_norm_eps))
    return x, cache


def forward(params: ModelParams, config: ModelConfig, tokens, valid, kv_state: KVState):
    """Runs `tokens` [batch, t] (valid: [batch, t] bool, a prefix per row) after the KV state.

    Positions continue from each sequence's `next_positions`. Returns the final-norm hidden states
    [batch, t, hidden] and the updated KV state.
    """
    positions = kv_state.next_positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = params.embed[tokens]
    caches = []
    for layer, cache in zip(params.layers, kv_state.layers):
        x, cache = decoder_layer(layer, cache, x, positions, valid, config)
        caches.append(cache)
    x = rms_norm(x, params.final_norm, config.rms_norm_eps)
    return x, KVState(layers=tuple(caches),
                      next_positions=kv_state.next_positions + valid.sum(1, dtype=jnp.int32))


def logits(params: ModelParams, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., vocab] of final-norm hidden states."""
    if params.lm_head is None:
        return jnp.einsum("...h,vh->...v", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", hidden, params.lm_head, preferred_element_type=jnp.float32)
