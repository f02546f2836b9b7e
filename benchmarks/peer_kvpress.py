"""The peer side of `engine.benchmark --peer`: the same workload through HF transformers (sdpa
attention) and NVIDIA kvpress 0.5.5, batch 1 (kvpress's only batch size), random bf16 weights in
the preset's shape. Prints one JSON line: prefill and decode tokens/s.

kvpress imports `datasets` and `fire` at package import for presses not used here; where they are
not installed (the GPU machine has no registry access) empty stand-ins are registered so the
import succeeds. kvpress needs transformers < 5.3.
"""

import importlib.util
import json
import sys
import time
import types

import torch
import transformers
from absl import app, flags

from models.config import PRESETS

_PRESET = flags.DEFINE_enum("preset", "llama-3.1-8b", list(PRESETS), "Model shape.")
_CONTEXT = flags.DEFINE_integer("context_length", 32768, "Context tokens.")
_METHOD = flags.DEFINE_string("method", "none", "none or a kvpress press name we share.")
_RATIO = flags.DEFINE_float("compression_ratio", 0.75, "kvpress compression_ratio.")
_STEPS = flags.DEFINE_integer("decode_steps", 64, "Tokens generated.")

PRESSES = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress", "knorm": "KnormPress",
           "tova": "TOVAPress", "streamingllm": "StreamingLLMPress",
           "expected_attention": "ExpectedAttentionPress"}


def import_kvpress():
    for name in ("datasets", "fire"):
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.load_dataset = stand_in.Fire = lambda *a, **k: None
            sys.modules[name] = stand_in
    import kvpress
    return kvpress


def hf_model(preset: str):
    c = PRESETS[preset]
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


@torch.no_grad()
def run_once(model, press, tokens, steps: int):
    cache = transformers.DynamicCache()

    positions = torch.arange(tokens.shape[1], device="cuda")

    def prefill():  # kvpress's hooks read cache_position, as its pipeline passes it
        if press is None:
            return model(tokens, past_key_values=cache, cache_position=positions,
                         logits_to_keep=1)
        with press(model):
            return model(tokens, past_key_values=cache, cache_position=positions,
                         logits_to_keep=1)

    out, prefill_seconds = timed(prefill)
    token = out.logits[:, -1:].argmax(-1)
    position = tokens.shape[1]

    def decode():
        nonlocal token, position
        for _ in range(steps - 1):
            ids = torch.tensor([[position]], device="cuda")
            out = model(token, past_key_values=cache, position_ids=ids)
            token = out.logits[:, -1:].argmax(-1)
            position += 1

    _, decode_seconds = timed(decode)
    return prefill_seconds, decode_seconds


def main(argv) -> None:
    del argv
    kvpress = import_kvpress()
    model = hf_model(_PRESET.value)
    press = None if _METHOD.value == "none" else getattr(kvpress, PRESSES[_METHOD.value])(
        compression_ratio=_RATIO.value)
    tokens = torch.randint(0, model.config.vocab_size, (1, _CONTEXT.value), device="cuda")
    run_once(model, press, tokens[:, :1024], 4)  # warm-up: kernels, allocator, autotuning
    prefill_seconds, decode_seconds = run_once(model, press, tokens, _STEPS.value)
    print(json.dumps(dict(method=_METHOD.value, context=_CONTEXT.value,
                          prefill_tok_s=_CONTEXT.value / prefill_seconds,
                          decode_tok_s=(_STEPS.value - 1) / decode_seconds,
                          transformers=transformers.__version__, torch=torch.__version__)))


if __name__ == "__main__":
    app.run(main)
