"""HF transformers (torch, CPU) as the independent reference for the model: tiny random models in
the configurations the engine supports, and their weights handed to our converter."""

import numpy as np
import torch
import transformers

from checkpoints_convert.to_params import params_from_hf
from models.config import config_from_hf

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None)

TINY_CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY, rope_theta=10000.0),
    "llama3.1": transformers.LlamaConfig(
        **TINY, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    "mistral": transformers.MistralConfig(**{**TINY, "tie_word_embeddings": True},
                                          rope_theta=10000.0, sliding_window=8),
}


def tiny_hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    hf_config = TINY_CONFIGS[name]
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm shows
        for module_name, p in model.named_parameters():
            if "norm" in module_name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def converted(model, dtype=np.float32):
    config = config_from_hf(model.config.to_dict())
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return config, params_from_hf(config, tensors, dtype)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def hf_greedy(model, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()
