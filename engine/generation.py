"""Generation: chunked prefill of the context, compression, the question, then a decode loop
that carries the KV state.

`generate` runs the decode loop as one compiled `lax.while_loop`; with `on_token` it runs the same
jitted step from Python instead, so text can stream to the terminal token by token. Prompts of
different lengths are right-padded into one batch; each row keeps its own positions and stops at
its own EOS. With a compression method, the context is compressed once it is prefilled and the
question (never compressed) follows at the positions after the uncompressed context, as in
kvpress's pipeline.
"""

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from compression.compress import Compression, Plan, compress, context_bytes
from compression.observations import LayerObservations, Needs, unwatch, watch
from compression.select import capacity_for, round_up
from pallas_kernels.errors import UserError
from models.kv_cache import FreshPrefillCache, KVState
from engine.sampling import Sampling, sample
from models import llama
from models.config import ModelConfig
from models.params import ModelParams

PREFILL_CHUNK = 1024


def bucket(n: int) -> int:
    """Static length for n tokens: the next power of two from 64 up to 1024, then 1024 steps."""
    if n <= 1024:
        return max(64, 1 << (n - 1).bit_length())
    return -(-n // 1024) * 1024


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    tokens: jax.Array  # [batch, max_new_tokens] int32, generated ids (pad after a row is done)
    step: jax.Array  # int32, how many tokens each row has generated
    done: jax.Array  # [batch] bool
    kv_state: KVState
    key: jax.Array


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # per prompt, generated ids up to and including EOS
    prompt_tokens: int
    compile_seconds: float
    prefill_seconds: float  # context, compression and question, compilation excluded
    compression_seconds: float
    decode_seconds: float
    kv_bytes: int  # the whole KV state held while decoding
    context_kv_bytes_before: int  # the context's KV as prefilled (n tokens, full precision)
    context_kv_bytes_after: int  # the context's KV as kept (equal to before without compression)
    kv_state: KVState  # as it stands after the last generated token was fed


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("kv_state",))
def extend(params: ModelParams, config: ModelConfig, tokens, valid, kv_state: KVState):
    """Runs one chunk of new tokens; returns each row's logits at its last valid token and the
    KV state."""
    hidden, kv_state = llama.forward(params, config, tokens, valid, kv_state)
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return llama.logits(params, last_hidden), kv_state


def pad_prompts(prompts: list[list[int]], length: int | None = None) -> np.ndarray:
    """Right-pads prompts to `length` (default: the bucket of the longest): [batch, length]."""
    padded = np.zeros((len(prompts), length or bucket(max(len(p) for p in prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    return padded


class Compiler:
    """Compiles jitted functions ahead of time so that run times exclude compilation."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, fn, *args, **static):
        start = time.perf_counter()
        compiled = fn.lower(*args, **static).compile()
        self.seconds += time.perf_counter() - start
        return compiled


def prefill(compiler: Compiler, params, config, prompts: list[list[int]], kv_state: KVState,
            padded_length: int | None = None, fresh: bool = False, needs: Needs | None = None):
    """Feeds right-padded prompts through `extend`; returns each row's last-token logits, the KV
    state and, when a compression method asks for `needs`, what it observed (one
    `LayerObservations` per layer, else None). A `fresh` (empty) KV state takes the whole prompt
    in one fused pass; otherwise the prompt goes in chunks of PREFILL_CHUNK tokens attending to
    the cache."""
    lengths = np.array([len(p) for p in prompts])
    longest = int(lengths.max())
    padded = pad_prompts(prompts, padded_length)
    chunk = padded.shape[1] if fresh else min(PREFILL_CHUNK, padded.shape[1])
    if needs is not None:
        observations = compiler(new_observations, needs, config, len(prompts),
                                kv_state.layers[0].capacity)()
        kv_state = watch(kv_state, needs, observations, config, fresh)
    elif fresh:
        kv_state = kv_state.map_layers(FreshPrefillCache)
    spec = jax.ShapeDtypeStruct((len(prompts), chunk), jnp.int32)
    extend_fn = compiler(extend, params, config, spec, spec.update(dtype=bool), kv_state)
    last_logits = None
    for start in range(0, longest, chunk):
        valid = np.arange(start, start + chunk)[None, :] < lengths[:, None]
        tokens = np.zeros((len(prompts), chunk), np.int32)
        piece = padded[:, start:start + chunk]
        tokens[:, :piece.shape[1]] = piece
        logits, kv_state = extend_fn(params, jnp.asarray(tokens), jnp.asarray(valid), kv_state)
        ends_here = jnp.asarray(valid.any(axis=1))[:, None]
        last_logits = logits if last_logits is None else jnp.where(ends_here, logits, last_logits)
    if needs is None:
        return last_logits, kv_state, None
    return (last_logits, *unwatch(kv_state))


@functools.partial(jax.jit, static_argnames=("sampling", "max_new_tokens"),
                   donate_argnames=("kv_state",))
def _first_token(logits, key, sampling: Sampling, max_new_tokens: int, kv_state) -> DecodeState:
    batch = logits.shape[0]
    token = sample(logits, jax.random.fold_in(key, 0), sampling)
    return DecodeState(tokens=jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token),
                       step=jnp.int32(1), done=jnp.zeros((batch,), bool), kv_state=kv_state,
                       key=key)


def decode_step(params, config: ModelConfig, sampling: Sampling, state: DecodeState) -> DecodeState:
    """Feeds each row's newest token, samples the next one and records it."""
    last = state.tokens[:, state.step - 1]
    done = state.done | jnp.isin(last, jnp.asarray(config.eos_token_ids, jnp.int32))
    hidden, kv_state = llama.forward(params, config, last[:, None], ~done[:, None], state.kv_state)
    logits = llama.logits(params, hidden[:, 0])
    token = sample(logits, jax.random.fold_in(state.key, state.step), sampling)
    token = jnp.where(done, 0, token)
    return DecodeState(tokens=state.tokens.at[:, state.step].set(token), step=state.step + 1,
                       done=done, kv_state=kv_state, key=state.key)


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def decode_step_jit(params, config, sampling, state):
    return decode_step(params, config, sampling, state)


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def decode_loop(params, config, sampling, state: DecodeState) -> DecodeState:
    """All remaining decode steps as one compiled `lax.while_loop`."""
    max_new_tokens = state.tokens.shape[1]
    eos = jnp.asarray(config.eos_token_ids, jnp.int32)

    def running(s: DecodeState):
        last_done = s.done | jnp.isin(s.tokens[:, s.step - 1], eos)
        return (s.step < max_new_tokens) & ~jnp.all(last_done)

    return jax.lax.while_loop(running, lambda s: decode_step(params, config, sampling, s), state)


def check_lengths(config: ModelConfig, prompts: list[list[int]], questions: list[list[int]],
                  max_new_tokens: int):
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise UserError("every prompt needs at least one token")
    if len(questions) != len(prompts):
        raise UserError(f"{len(questions)} questions for {len(prompts)} contexts")
    longest = max(len(p) + len(q) for p, q in zip(prompts, questions))
    if longest + max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {config.max_position_embeddings} tokens; shorten the prompt")


def _trim(row: np.ndarray, eos_ids) -> list[int]:
    out = []
    for token in row.tolist():
        out.append(token)
        if token in eos_ids:
            break
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def new_observations(needs, config: ModelConfig, batch: int, capacity: int):
    return tuple(LayerObservations.empty(needs, batch, config.num_heads, config.num_kv_heads,
                                         config.head_dim, capacity)
                 for _ in range(config.num_layers))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def empty_kv_state(config: ModelConfig, batch: int, capacity: int, dtype) -> KVState:
    return KVState.empty(config, batch, capacity, dtype)


def prefill_capacity(padded_length: int, after_context: int, compression) -> int:
    """Slots of the cache a context is prefilled into: the padded context alone when compression
    replaces that cache, else room for the question and the generated tokens too."""
    return padded_length if compression else capacity_for(padded_length + after_context)


def compress_contexts(compiler: Compiler, compression: Compression, config: ModelConfig,
                      kv_state: KVState, observations, context_lengths: list[int],
                      after_context: int, plan: Plan | None = None) -> KVState:
    """Compresses each prefilled context to its budget; `after_context` slots stay free for the
    question and the generated tokens. `plan` defaults to the plan of these contexts alone."""
    plan = plan or Plan.make(compression, context_lengths, config.num_layers,
                             config.num_kv_heads)
    budgets = plan.budgets(compression.budget, context_lengths, after_context)
    compressed = compiler(compress, compression.compressor, config, kv_state, observations,
                          budgets, compression.params)
    return compressed(kv_state, observations, budgets, compression.params)


def feed_questions(compiler: Compiler, params, config, questions: list[list[int]],
                   kv_state: KVState, logits):
    """Appends the questions (never compressed); rows without one keep their context logits."""
    if not any(questions):
        return logits, kv_state
    question_logits, kv_state, _ = prefill(compiler, params, config,
                                           [q or [0] for q in questions], kv_state)
    has_question = jnp.asarray([bool(q) for q in questions])[:, None]
    return jnp.where(has_question, question_logits, logits), kv_state


def decode(compiler: Compiler, params, config, sampling: Sampling, logits, kv_state: KVState,
           max_new_tokens: int, seed: int, on_token=None) -> DecodeState:
    """Samples the first token from `logits`, then runs the decode loop (compiled, or step by
    step with `on_token` for streaming)."""
    key = jax.random.key(seed)
    state = compiler(_first_token, logits, key, sampling, max_new_tokens, kv_state)(
        logits, key, kv_state)
    decode_fn = compiler(decode_loop if on_token is None else decode_step_jit, params, config,
                         sampling, state)
    if on_token is None:
        return decode_fn(params, state)
    eos = set(config.eos_token_ids)
    token = int(np.asarray(state.tokens)[0, 0])
    on_token(token)
    for step in range(1, max_new_tokens):
        if token in eos:
            break
        state = decode_fn(params, state)
        token = int(np.asarray(state.tokens)[0, step])  # whole-array copy: no per-step compile
        on_token(token)
    return state


def generated_tokens(state: DecodeState, config: ModelConfig) -> list[list[int]]:
    eos = set(config.eos_token_ids)
    return [_trim(row, eos) for row in np.asarray(state.tokens)]


class Stopwatch:
    """Wall time of a stage, device work included, compilation (counted by `compiler`) not."""

    def __init__(self, compiler: Compiler):
        self.compiler = compiler

    def __enter__(self):
        jax.effects_barrier()
        self.start, self.compiled_before = time.perf_counter(), self.compiler.seconds
        return self

    def stop(self, *results) -> float:
        jax.block_until_ready(results)
        compiling = self.compiler.seconds - self.compiled_before
        self.seconds = time.perf_counter() - self.start - compiling
        return self.seconds

    def __exit__(self, *exc):
        return False


@functools.partial(jax.jit, static_argnames=("start",), donate_argnames=("whole",))
def _write_rows(whole, part, start: int):
    return jax.tree.map(lambda w, p: jax.lax.dynamic_update_slice_in_dim(w, p, start, 0),
                        whole, part)


def prefill_and_compress(compiler: Compiler, params, config: ModelConfig,
                         prompts: list[list[int]], after_context: int, kv_dtype,
                         compression: Compression | None, group: int):
    """Prefills the contexts `group` at a time, each group in one fused pass into a cache of its
    own, and compresses each group as soon as it is in, so a compressed batch can be larger than
    one whose full-size caches fit at once. Returns each row's last-token logits, the batch's KV
    state with `after_context` free slots per stream, and the seconds spent prefilling and
    compressing (compilation excluded)."""
    batch, padded_length = pad_prompts(prompts).shape
    context_lengths = [len(p) for p in prompts]
    needs = compression.compressor.needs() if compression else None
    needs = needs if needs and needs.any() else None
    plan = compression and Plan.make(compression, context_lengths, config.num_layers,
                                     config.num_kv_heads)
    capacity = prefill_capacity(padded_length, after_context, compression)
    prefill_seconds = compression_seconds = 0.0
    logits = kv_state = None
    for start in range(0, batch, group):
        rows = slice(start, start + group)
        part = compiler(empty_kv_state, config, len(prompts[rows]), capacity, kv_dtype)()
        with Stopwatch(compiler) as prefill_time:
            part_logits, part, observations = prefill(compiler, params, config, prompts[rows],
                                                      part, padded_length, fresh=True,
                                                      needs=needs)
            prefill_seconds += prefill_time.stop(part_logits)
        if compression is not None:
            with Stopwatch(compiler) as compress_time:
                part = compress_contexts(compiler, compression, config, part, observations,
                                         context_lengths[rows], after_context, plan.rows(rows))
                compression_seconds += compress_time.stop(part)
        if group == batch:
            return part_logits, part, prefill_seconds, compression_seconds
        if kv_state is None:
            whole = lambda x: jnp.zeros((batch, *x.shape[1:]), x.dtype)
            logits, kv_state = whole(part_logits), jax.tree.map(whole, part)
        logits = logits.at[rows].set(part_logits)
        kv_state = _write_rows(kv_state, part, start)
    return logits, kv_state, prefill_seconds, compression_seconds


def generate(params: ModelParams, config: ModelConfig, prompts: list[list[int]],
             max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
             on_token: Callable[[int], None] | None = None, kv_dtype=None,
             compression: Compression | None = None,
             questions: list[list[int]] | None = None,
             prefill_batch: int | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt (the context) and its question:
    prefill the contexts, compress them, append the questions, decode.

    With `compression`, each context's KV is compressed after its prefill; the question is
    appended after compression and never compressed. `on_token(id)` streams a one-row batch.
    `prefill_batch` prefills (and compresses) that many contexts at a time. Every program is
    compiled ahead of time, so the reported speeds exclude compilation.
    """
    questions = questions or [[] for _ in prompts]
    if compression is not None and compression.compressor.capabilities.decode_step:
        # the budget covers everything: the question is prefilled and compressed with the context
        prompts, questions = [p + q for p, q in zip(prompts, questions)], [[] for _ in prompts]
    check_lengths(config, prompts, questions, max_new_tokens)
    if on_token is not None and len(prompts) != 1:
        raise UserError("streaming generates one prompt at a time")
    kv_dtype = kv_dtype or params.embed.dtype
    after_context = round_up(max(len(q) for q in questions) + max_new_tokens)
    context_lengths = [len(p) for p in prompts]
    per_token = config.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize)
    compiler = Compiler()

    logits, kv_state, prefill_seconds, compression_seconds = prefill_and_compress(
        compiler, params, config, prompts, after_context, kv_dtype, compression,
        group=min(prefill_batch or len(prompts), len(prompts)))
    context_after = (context_bytes(kv_state, after_context) if compression
                     else sum(context_lengths) * per_token)
    with Stopwatch(compiler) as question_time:
        logits, kv_state = feed_questions(compiler, params, config, questions, kv_state, logits)
        question_time.stop(logits)
    with Stopwatch(compiler) as decode_time:
        state = decode(compiler, params, config, sampling, logits, kv_state, max_new_tokens, seed,
                       on_token)
        decode_time.stop(state.tokens)
    return GenerationResult(
        tokens=generated_tokens(state, config),
        prompt_tokens=sum(context_lengths) + sum(len(q) for q in questions),
        compile_seconds=compiler.seconds,
        prefill_seconds=prefill_seconds + compression_seconds + question_time.seconds,
        compression_seconds=compression_seconds, decode_seconds=decode_time.seconds,
        kv_bytes=state.kv_state.nbytes(), context_kv_bytes_before=sum(context_lengths) * per_token,
        context_kv_bytes_after=context_after, kv_state=state.kv_state)
