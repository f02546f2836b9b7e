"""Parameter pytrees of the Llama/Mistral decoder, and the one declaration of their shapes.

Matrices are stored as (in_features, out_features) so the forward pass is `x @ w`; query and key
projections use HF's "rotate half" RoPE layout. The query, key and value projections are one
matrix, and so are the gate and up projections: a decode step then reads each as one product
(measured on the H100: 6.2 ms instead of 7.6 ms for the Llama-3.1-8B step's weights). Layers are a
tuple, not a stacked array: the forward pass unrolls them, which keeps every decode step reading
each weight once (a `lax.scan` over stacked weights copied the per-layer slices and reached 35% of
the HBM floor; see DESIGN.md).

`declare_params` states each field's shape, logical axes and initializer once (the `ArrayInfo`
idea of jax-llm-examples, DESIGN.md decision 15); random init, the abstract tree orbax restores
into, the axis names sharding rules read, the byte count memory prediction uses and the shape
checks of checkpoint loading are all derived from it. Logical axes: "vocab", "embed" (hidden),
"qkv" (fused query | key | value outputs), "heads" (query heads x head_dim), "kv_heads" (key or
value heads x head_dim) and "mlp" (intermediate; fused gate | up too).
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


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter: its shape, the logical name of each axis and how random init fills it.

    A fused matrix lists its `parts` (name, width) along the last axis, in order: checkpoints hold
    the parts as separate tensors (`wq`, `wk`, `wv`; `w_gate`, `w_up`)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "matrix", "norm" or "embedding": a key of INITIALIZERS
    parts: tuple[tuple[str, str, int], ...] = ()  # (name, logical axis, width) of a fused last axis

    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: (*self.shape[:-1], width) for name, _, width in self.parts}

    def part_axes(self) -> dict[str, tuple[str, ...]]:
        return {name: (*self.axes[:-1], axis) for name, axis, _ in self.parts}


def _matrix(shape, axes) -> ParamInfo:
    return ParamInfo(tuple(shape), axes, "matrix")


def _fused(rows: int, axes, parts) -> ParamInfo:
    return ParamInfo((rows, sum(width for _, _, width in parts)), axes, "matrix", tuple(parts))


def _norm(size: int) -> ParamInfo:
    return ParamInfo((size,), ("embed",), "norm")


def declare_layer(config: ModelConfig) -> LayerParams:
    """One decoder layer's fields as `ParamInfo`s (every layer has the same)."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    return LayerParams(
        attn_norm=_norm(h),
        wqkv=_fused(h, ("embed", "qkv"),
                    [("wq", "heads", q), ("wk", "kv_heads", kv), ("wv", "kv_heads", kv)]),
        wo=_matrix((q, h), ("heads", "embed")),
        mlp_norm=_norm(h),
        w_gate_up=_fused(h, ("embed", "mlp"), [("w_gate", "mlp", inter), ("w_up", "mlp", inter)]),
        w_down=_matrix((inter, h), ("mlp", "embed")))


def declare_params(config: ModelConfig) -> ModelParams:
    """The whole parameter tree with a `ParamInfo` at every leaf: the one statement of shapes."""
    h, vocab = config.hidden_size, config.vocab_size
    return ModelParams(
        embed=ParamInfo((vocab, h), ("vocab", "embed"), "embedding"),
        layers=(declare_layer(config),) * config.num_layers,
        final_norm=_norm(h),
        lm_head=None if config.tie_word_embeddings else _matrix((h, vocab), ("embed", "vocab")))


INITIALIZERS = {  # float32 draws; the caller casts
    "matrix": lambda key, shape: jax.random.normal(key, shape, jnp.float32) / shape[0] ** 0.5,
    "norm": lambda key, shape: 1.0 + 0.1 * jax.random.normal(key, shape, jnp.float32),
    "embedding": lambda key, shape: jax.random.normal(key, shape, jnp.float32) * 0.5,
}


def init_random_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> ModelParams:
    """Random weights in the declared shapes (for speed work and tests); norms start near 1.

    Keys: `split(key, layers + 3)` gives one key per layer (split again over its fields, in field
    order), then embed, lm_head and final_norm. Tests and benchmarks rely on this layout."""
    declared = declare_params(config)
    keys = jax.random.split(key, config.num_layers + 3)

    def fill(info: ParamInfo, k):
        return INITIALIZERS[info.init](k, info.shape).astype(dtype)

    def layer(infos: LayerParams, k) -> LayerParams:
        fields = dataclasses.fields(LayerParams)
        field_keys = jax.random.split(k, len(fields))
        return LayerParams(**{f.name: fill(getattr(infos, f.name), fk)
                              for f, fk in zip(fields, field_keys)})

    return ModelParams(
        embed=fill(declared.embed, keys[-3]),
        layers=tuple(layer(infos, k) for infos, k in zip(declared.layers, keys)),
        final_norm=fill(declared.final_norm, keys[-1]),
        lm_head=None if declared.lm_head is None else fill(declared.lm_head, keys[-2]))


def abstract_params(config: ModelConfig, dtype, sharding=None) -> ModelParams:
    """The parameter tree as `jax.ShapeDtypeStruct`s: what orbax restores into. `sharding` is one
    sharding for every leaf or a `ModelParams`-shaped tree of them."""
    declared = declare_params(config)
    if isinstance(sharding, ModelParams):
        return jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, dtype, sharding=s),
                            declared, sharding)
    return jax.tree.map(lambda info: jax.ShapeDtypeStruct(info.shape, dtype, sharding=sharding),
                        declared)


def logical_axes(config: ModelConfig) -> ModelParams:
    """A `ModelParams` whose leaves are tuples of logical axis names, one per array axis. The
    tuples are pytrees themselves: map over them with the params first,
    `jax.tree.map(lambda x, axes: ..., params, logical_axes(config))`."""
    return jax.tree.map(lambda info: info.axes, declare_params(config))


def param_bytes(params: ModelParams) -> int:
    """Bytes of a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def declared_param_bytes(config: ModelConfig, dtype) -> int:
    """Bytes the parameters of `config` take in `dtype`, from the declaration alone."""
    return param_bytes(abstract_params(config, dtype))
