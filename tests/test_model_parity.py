"""The model against HF transformers (torch CPU, fp32): logits and greedy generation."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from checkpoints_convert.load import default_checkpoint_path, load_checkpoint
from engine.generation import generate
from models.kv_cache import KVState
from models import llama
from tests.hf_reference import TINY_CONFIGS, converted, hf_greedy, hf_logits, tiny_hf_model


def our_logits(params, config, tokens: np.ndarray) -> np.ndarray:
    state = KVState.empty(config, tokens.shape[0], tokens.shape[1], jnp.float32)
    hidden, _ = llama.forward(params, config, jnp.asarray(tokens),
                              jnp.ones(tokens.shape, bool), state)
    return np.asarray(llama.logits(params, hidden))


def assert_logits_close(ours, ref):
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


@pytest.fixture(scope="module")
def smollm2():
    path = default_checkpoint_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    checkpoint = load_checkpoint(path, jnp.float32)
    return hf, checkpoint


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_model_logits_match_hf(name):
    model = tiny_hf_model(name)
    config, params = converted(model)
    if name == "mistral":
        assert config.sliding_window == 8
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))  # 24 > window
    assert_logits_close(our_logits(params, config, tokens), hf_logits(model, tokens))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_model_greedy_32_tokens_match_hf(name):
    model = tiny_hf_model(name, seed=1)
    config, params = converted(model)
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, (1, 11))
    ours = generate(params, config, prompt.tolist(), 32).tokens[0]
    assert ours == hf_greedy(model, prompt, 32)[0].tolist()


def test_smollm2_gguf_logits_match_hf(smollm2):
    hf, checkpoint = smollm2
    tokens = np.array([checkpoint.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue.")])
    assert_logits_close(our_logits(checkpoint.params, checkpoint.config, tokens),
                        hf_logits(hf, tokens))


def test_smollm2_gguf_greedy_32_tokens_match_hf(smollm2):
    hf, checkpoint = smollm2
    text = checkpoint.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}])
    prompt = np.array([checkpoint.tokenizer.encode(text)])
    ours = generate(checkpoint.params, checkpoint.config, prompt.tolist(), 32).tokens[0]
    reference = hf_greedy(hf, prompt, 32)[0].tolist()
    assert ours == reference[:len(ours)]  # ours stops at EOS; HF pads after it
    assert len(ours) == 32 or ours[-1] in checkpoint.config.eos_token_ids
