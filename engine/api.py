"""The Python API for the common path: load a model, name a compressor, generate a batch.

    from engine import api

    model = api.load()  # SmolLM2-135M-Instruct unless a GGUF, HF or orbax path is given
    snapkv = api.compression("snapkv", ratio=0.5)  # any --compress name, ratio or kv_budget
    out = api.generate(model, contexts=["The letter was signed by Ada. " * 20],
                       questions=["Who signed the letter?"], compression=snapkv,
                       chat=True, max_new_tokens=16)
    print(out.texts[0], out.kv_bytes)

It runs what `python -m engine.generate` runs: the same default budget (ratio 0.5 when a method
is named without one), the same chat template split (the template's header is compressed with
the context, its footer is appended with the question), and texts decoded without the tokens
that end a reply.
"""

import dataclasses

import jax
import jax.numpy as jnp

from checkpoints_convert.load import Checkpoint, load_checkpoint
from compression.base import Budget
from compression.compress import Compression
from compression.registry import make_compression, parse
from engine.generation import GenerationResult, generate as generate_tokens
from engine.sampling import Sampling
from models.tokenizer import Tokenizer

DEFAULT_RATIO = 0.5


def default_dtype():
    """float32 on the CPU, bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load(checkpoint: str | None = None, dtype=None) -> Checkpoint:
    """A GGUF file, a HF directory or an orbax directory (None: the default model)."""
    return load_checkpoint(checkpoint, dtype or default_dtype())


def compression(spec: str, ratio: float | None = None, kv_budget: int | None = None,
                decode_eviction: bool = False) -> Compression | None:
    """The compression named by `spec` (`snapkv`, `adakv:snapkv`, `snapkv+kivi2`, `none`...)
    with a compression ratio or a token budget; an eviction method named without either removes
    half the context, as the CLI does."""
    budget = None
    if ratio is not None or kv_budget is not None:
        budget = Budget(ratio=ratio, tokens=kv_budget)
    elif parse(spec)[0] is not None:
        budget = Budget(ratio=DEFAULT_RATIO)
    return make_compression(spec, budget, decode_eviction)


def chat_segments(tokenizer: Tokenizer, context: str, question: str) -> tuple[str, str]:
    """Renders the chat template around context + question and splits it where the question
    starts, so the template's header goes with the context and its footer with the question."""
    marker = "\u2063SPLIT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + marker}])
    before, after = text.split(marker)
    return before, (f"\n\n{question}" if question else "") + after


@dataclasses.dataclass
class Output:
    texts: list[str]  # per context, without the token that ended the reply
    kv_bytes: int  # the KV state held while decoding
    context_kv_bytes: int  # the contexts' KV as kept (before compression: `result`)
    result: GenerationResult  # token ids, timings, the final KV state


def generate(model: Checkpoint, contexts: list[str], questions: list[str] | None = None,
             compression: Compression | None = None, chat: bool = False,
             max_new_tokens: int = 128, sampling: Sampling = Sampling(),
             seed: int = 0) -> Output:
    """Generates after each context and its question (appended after compression, never
    compressed); with `chat`, the pair is wrapped in the model's chat template."""
    tokenizer = model.tokenizer
    questions = questions or ["" for _ in contexts]
    if chat:
        contexts, questions = zip(*(chat_segments(tokenizer, c, q)
                                    for c, q in zip(contexts, questions)))
    result = generate_tokens(
        model.params, model.config, [tokenizer.encode(c) for c in contexts], max_new_tokens,
        sampling, seed, compression=compression,
        questions=[tokenizer.encode(q) if q else [] for q in questions])
    eos = set(model.config.eos_token_ids)
    texts = [tokenizer.decode([t for t in tokens if t not in eos]) for tokens in result.tokens]
    return Output(texts, result.kv_bytes, result.context_kv_bytes_after, result)
