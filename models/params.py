"""Parameter pytrees of the Llama/Mistral decoder.

Matrices are stored as (in_features, out_features) so the forward pass is `x @ w`; query and key
projections use HF's "rotate half" RoPE layout. The query, key and value projections are one
matrix, and so are the gate and up projections: a decode step then reads each as one product
(measured on the H100: 6.2 ms instead of 7.6 ms for the Llama-3.1-8B step's weights). Layers are a tuple, not a stacked array: the forward
pass unrolls them, which keeps every decode step reading each weight once (a `lax.scan` over
stacked weights copied the per-layer slices and reached 35% of the HBM floor; see DESIGN.md).
"""

import dataclasses

import jax
import jax.numpy as jnp

from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    attn_norm: jax.Array  # [hidden]
    wqkv: jax.Array  # [hidden, (heads + 2 * kv_heads) * head_dim]: queries | keys | values
    wo: jax.Array  # [heads * head_dim, hidden]
    mlp_norm: jax.Array  # [hidden]
    w_gate_up: jax.Array  # [hidden, 2 * intermediate]: gate | up
    w_down: jax.Array  # [intermediate, hidden]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelParams:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab]; None when tied to `embed`


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = config.hidden_size, config.head_dim
    return {
        "attn_norm": (h,),
        "wqkv": (h, (config.num_heads + 2 * config.num_kv_heads) * d),
        "wo": (config.num_heads * d, h),
        "mlp_norm": (h,),
        "w_gate_up": (h, 2 * config.intermediate_size),
        "w_down": (config.intermediate_size, h),
    }


def init_random_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> ModelParams:
    """Random weights in the model's real shapes (for speed work and tests); norms start at 1."""

    def matrix(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) / shape[0] ** 0.5).astype(dtype)

    def norm(k, shape):
        return (1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    keys = jax.random.split(key, config.num_layers + 3)
    layers = []
    for layer_key in keys[:config.num_layers]:
        shapes = layer_shapes(config)
        field_keys = dict(zip(shapes, jax.random.split(layer_key, len(shapes))))
        layers.append(LayerParams(**{
            name: (norm if name.endswith("norm") else matrix)(field_keys[name], shape)
            for name, shape in shapes.items()}))
    embed = (jax.random.normal(keys[-3], (config.vocab_size, config.hidden_size)) * 0.5).astype(dtype)
    lm_head = None if config.tie_word_embeddings else matrix(
        keys[-2], (config.hidden_size, config.vocab_size))
    return ModelParams(embed=embed, layers=tuple(layers),
                       final_norm=norm(keys[-1], (config.hidden_size,)), lm_head=lm_head)


def param_bytes(params: ModelParams) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
