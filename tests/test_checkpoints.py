"""Checkpoints end to end: HF safetensors folders (single file and sharded) load into the same
model HF runs, and a converted orbax checkpoint restores exactly what it was converted from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert.load import convert_checkpoint as convert
from checkpoints_convert.load import default_checkpoint_path, load_checkpoint
from checkpoints_convert.gguf import read_gguf
from models.tokenizer import tokenizer_from_gguf_metadata
from tests.hf_reference import hf_logits, tiny_hf_model
from tests.test_model_parity import assert_logits_close, our_logits


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return tokenizer_from_gguf_metadata(read_gguf(default_checkpoint_path()).metadata)


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_hf_folder_loads_the_model_hf_runs(tmp_path, smollm2_tokenizer, shard_size):
    model = tiny_hf_model("llama3.1")
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    smollm2_tokenizer.save(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_size)
    checkpoint = load_checkpoint(str(tmp_path), jnp.float32)
    tokens = np.random.default_rng(0).integers(0, 160, (1, 20))
    assert_logits_close(our_logits(checkpoint.params, checkpoint.config, tokens),
                        hf_logits(model, tokens))


def test_converted_orbax_checkpoint_restores_the_gguf_model(tmp_path):
    convert(None, str(tmp_path / "out"), jnp.bfloat16)
    original = load_checkpoint(None, jnp.bfloat16)
    restored = load_checkpoint(str(tmp_path / "out"), jnp.bfloat16)
    assert restored.config == original.config
    for a, b in zip(jax.tree.leaves(original.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "Converted checkpoints keep their vocabulary: 12345 ünïcode <|im_start|>"
    assert restored.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert restored.tokenizer.eos_ids == original.tokenizer.eos_ids
    assert restored.tokenizer.chat_template == original.tokenizer.chat_template
