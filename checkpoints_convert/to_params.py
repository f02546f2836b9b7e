"""Maps tensors named as in HF checkpoints or GGUF files onto `ModelParams`.

HF stores linear weights as [out, in]; we store [in, out]. GGUF (llama.cpp's converter) permutes
the rows of the query and key projections into interleaved-pair RoPE order; `unpermute_gguf_rows`
undoes that so both sources give HF's rotate-half layout.
Shapes come from `models.params.declare_params`: every tensor is checked against its declared
shape (a fused field's parts one by one) before it is used.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.errors import UserError
from models.config import ModelConfig
from models.params import LayerParams, ModelParams, ParamInfo, declare_params

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


def _as_param(raw, name: str, shape: tuple[int, ...], dtype, transpose: bool,
              fix_rows=lambda w: w) -> jax.Array:
    """Checks `raw` against the declared `shape` (in our orientation) before touching it."""
    array = np.asarray(raw)
    expected = shape[::-1] if transpose else shape
    if array.shape != expected:
        raise UserError(f"checkpoint tensor {name} has shape {array.shape}, but its config "
                        f"expects {expected}: the checkpoint and its config do not match")
    array = fix_rows(array)
    return jnp.asarray(array.T if transpose else array, dtype)


def _build(config: ModelConfig, get: Callable[[str], np.ndarray], layer_names, global_names,
           dtype, fix_rows=lambda part, w: w) -> ModelParams:
    """Reads each declared field (a fused field from its parts, concatenated on the last axis)."""

    def load(names, field: str, info: ParamInfo, **format_args):
        transpose = len(info.shape) == 2 and field != "embed"  # checkpoints store [out, in]
        parts = info.part_shapes() or {field: info.shape}
        arrays = []
        for part, shape in parts.items():
            name = names[part].format(**format_args)
            arrays.append(_as_param(get(name), name, shape, dtype, transpose,
                                    lambda w: fix_rows(part, w)))
        return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)

    declared = declare_params(config)
    layers = tuple(
        LayerParams(**{f.name: load(layer_names, f.name, getattr(infos, f.name), i=i)
                       for f in dataclasses.fields(LayerParams)})
        for i, infos in enumerate(declared.layers))
    return ModelParams(
        embed=load(global_names, "embed", declared.embed),
        layers=layers,
        final_norm=load(global_names, "final_norm", declared.final_norm),
        lm_head=None if declared.lm_head is None else load(global_names, "lm_head",
                                                           declared.lm_head))


def params_from_hf(config: ModelConfig, tensors: dict[str, np.ndarray], dtype) -> ModelParams:
    def get(name):
        if name not in tensors:
            raise UserError(f"checkpoint lacks tensor {name}")
        return tensors[name]

    return _build(config, get, HF_LAYER_NAMES, HF_GLOBAL_NAMES, dtype)


def params_from_gguf(config: ModelConfig, tensor: Callable[[str], np.ndarray], dtype) -> ModelParams:
    """`tensor(name)` returns a dequantized GGUF tensor in numpy (row-major, HF orientation)."""

    def fix_rows(part, w):
        if part == "wq":
            return unpermute_gguf_rows(w, config.num_heads)
        if part == "wk":
            return unpermute_gguf_rows(w, config.num_kv_heads)
        return w

    return _build(config, tensor, GGUF_LAYER_NAMES, GGUF_GLOBAL_NAMES, dtype, fix_rows)
