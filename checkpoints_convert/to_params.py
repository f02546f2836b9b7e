"""Maps tensors named as in HF checkpoints or GGUF files onto `ModelParams`.

HF stores linear weights as [out, in]; we store [in, out]. GGUF (llama.cpp's converter) permutes
the rows of the query and key projections into interleaved-pair RoPE order; `unpermute_gguf_rows`
undoes that so both sources give HF's rotate-half layout.
"""

from typing import Callable

import jax.numpy as jnp
import numpy as np

from pallas_kernels.errors import UserError
from models.config import ModelConfig
from models.params import LayerParams, ModelParams

HF_LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
HF_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}

GGUF_LAYER_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                     "lm_head": "output.weight"}


def unpermute_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: rows (head, pair, 2) -> (head, 2, pair)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _as_param(raw: np.ndarray, name: str, shape, dtype, transpose: bool):
    array = np.asarray(raw)
    array = array.T if transpose else array
    if array.shape != shape:
        raise UserError(f"tensor {name} has shape {np.shape(raw)}, which does not fit the config")
    return jnp.asarray(array, dtype)


def source_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the separate checkpoint tensors, in our (in, out) orientation."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    return {"attn_norm": (h,), "wq": (h, config.num_heads * d), "wk": (h, config.num_kv_heads * d),
            "wv": (h, config.num_kv_heads * d), "wo": (config.num_heads * d, h), "mlp_norm": (h,),
            "w_gate": (h, inter), "w_up": (h, inter), "w_down": (inter, h)}


def _build(config: ModelConfig, get: Callable[[str], np.ndarray], layer_names, global_names,
           dtype, fix_rows=lambda field, w: w) -> ModelParams:
    shapes = source_shapes(config)
    layers = []
    for i in range(config.num_layers):
        parts = {}
        for field, pattern in layer_names.items():
            name = pattern.format(i=i)
            raw = fix_rows(field, np.asarray(get(name)))
            parts[field] = _as_param(raw, name, shapes[field], dtype, transpose=raw.ndim == 2)
        layers.append(LayerParams(
            attn_norm=parts["attn_norm"],
            wqkv=jnp.concatenate([parts["wq"], parts["wk"], parts["wv"]], axis=1),
            wo=parts["wo"], mlp_norm=parts["mlp_norm"],
            w_gate_up=jnp.concatenate([parts["w_gate"], parts["w_up"]], axis=1),
            w_down=parts["w_down"]))
    lm_head = None
    if not config.tie_word_embeddings:
        name = global_names["lm_head"]
        lm_head = _as_param(get(name), name, (config.hidden_size, config.vocab_size), dtype, True)
    embed, norm = global_names["embed"], global_names["final_norm"]
    return ModelParams(
        embed=_as_param(get(embed), embed, (config.vocab_size, config.hidden_size), dtype, False),
        layers=tuple(layers),
        final_norm=_as_param(get(norm), norm, (config.hidden_size,), dtype, False),
        lm_head=lm_head)


def params_from_hf(config: ModelConfig, tensors: dict[str, np.ndarray], dtype) -> ModelParams:
    def get(name):
        if name not in tensors:
            raise UserError(f"checkpoint lacks tensor {name}")
        return tensors[name]

    return _build(config, get, HF_LAYER_NAMES, HF_GLOBAL_NAMES, dtype)


def params_from_gguf(config: ModelConfig, tensor: Callable[[str], np.ndarray], dtype) -> ModelParams:
    """`tensor(name)` returns a dequantized GGUF tensor in numpy (row-major, HF orientation)."""

    def fix_rows(field, w):
        if field == "wq":
            return unpermute_gguf_rows(w, config.num_heads)
        if field == "wk":
            return unpermute_gguf_rows(w, config.num_kv_heads)
        return w

    return _build(config, tensor, GGUF_LAYER_NAMES, GGUF_GLOBAL_NAMES, dtype, fix_rows)
