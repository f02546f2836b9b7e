"""A converted (orbax) checkpoint of a tiny random model with SmolLM2's tokenizer: what the CLI
tests load in a few seconds instead of the real model."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from checkpoints_convert.gguf import read_gguf
from checkpoints_convert.load import (ORBAX_CONFIG, ORBAX_PARAMS, config_to_json,
                                      default_checkpoint_path)
from checkpoints_convert.orbax_store import save_tree
from models.config import PRESETS
from models.params import init_random_params
from models.tokenizer import tokenizer_from_gguf_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tiny_checkpoint(directory: str) -> str:
    config = dataclasses.replace(PRESETS["smollm2-135m"], hidden_size=16, intermediate_size=32,
                                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    os.makedirs(directory)
    save_tree(os.path.join(directory, ORBAX_PARAMS),
              init_random_params(config, jax.random.key(0), jnp.float32))
    with open(os.path.join(directory, ORBAX_CONFIG), "w") as f:
        f.write(config_to_json(config))
    tokenizer_from_gguf_metadata(read_gguf(default_checkpoint_path()).metadata).save(directory)
    return directory


def start_cli(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_one_line(result, first: str, *fragments: str) -> str:
    """stderr is exactly one line, starting with `first` and holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(first), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
