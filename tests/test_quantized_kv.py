"""Quantized KV stores (KIVI, int8, int4): the quantizers and the flush rule match NumPy
transcriptions of KIVI's code bit for bit, attention over the quantized cache equals attention
over the dequantized one, the bytes held are the packed size, and the engine and CLI run them."""

import concurrent.futures
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.base import Budget, Chain
from compression.compress import Compression
from compression.int4 import Int4
from compression.int8 import Int8
from compression.kivi import KIVI
from compression.pyramidkv import PyramidKV
from compression.quantized_cache import QuantizedKVCache
from compression.registry import make_compression
from engine.generation import Compiler, compress_contexts, generate, prefill
from models.kv_cache import DenseKVCache, KVState
from pallas_kernels import kv_packing as kp
from tests.hf_reference import converted, tiny_hf_model
from tests.test_cli import assert_one_line_error, run_cli

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# KIVI's quantizer divides; XLA's GPU division is not correctly rounded (scales move by an ulp)
bit_exact = pytest.mark.skipif(jax.default_backend() != "cpu",
                               reason="NumPy's division is IEEE, the GPU's is not")

# ----------------------------------------------------------------------- NumPy transcriptions


def kivi_quantize(x, bits):
    """KIVI's quantizer (quant/new_pack.py) over groups along the last axis, in float32:
    (codes, scale, min). A zero range gives NaN codes, which CUDA converts to 0."""
    mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    scale = (mx - mn) / np.float32(2**bits - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.round(np.clip((x - mn) / scale, 0, 2**bits - 1))
    return np.nan_to_num(codes, nan=0.0).astype(np.uint8), scale[..., 0], mn[..., 0]


def kivi_pack(codes, bits):
    """KIVI's pack_tensor: 32 // bits codes per int32 along the last axis, the first in the
    least significant bits; returned as the int32s' little-endian bytes."""
    per = 32 // bits
    words = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, per)
    words = (words << (bits * np.arange(per, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    return words.astype("<u4").view(np.uint8).reshape(*codes.shape[:-1], -1)


@dataclasses.dataclass(frozen=True)
class NumpyQuantizer:
    """One of the stores' quantizers on one sequence's heads [H, T, D]: `quantize` gives a tuple
    of arrays that concatenate along tokens (axis 1), `dense` dequantizes such a tuple."""

    kind: str  # "channel" (KIVI keys), "token" (KIVI values, int4) or "int8"
    bits: int = 8
    group: int = 32

    def quantize(self, x):
        h, t, d = x.shape
        if self.kind == "int8":  # absmax per token: scale = max|x| / 127, code = round(x / s)
            scale = np.abs(x).max(-1) / np.float32(127)
            safe = np.where(scale > 0, scale, np.float32(1))[..., None]
            return np.clip(np.round(x / safe), -127, 127).astype(np.int8), scale
        if self.kind == "channel":  # KIVI transposes keys: groups of tokens of one channel
            grouped = x.transpose(0, 2, 1).reshape(h, d, t // self.group, self.group)
            codes, scale, zero = kivi_quantize(grouped, self.bits)
            return (codes.reshape(h, d, t).transpose(0, 2, 1), scale.transpose(0, 2, 1),
                    zero.transpose(0, 2, 1))
        codes, scale, zero = kivi_quantize(x.reshape(h, t, d // self.group, self.group),
                                           self.bits)
        return codes.reshape(h, t, d), scale, zero

    def dense(self, parts):
        if self.kind == "int8":
            return parts[0].astype(np.float32) * parts[1][..., None]
        axis = 1 if self.kind == "channel" else 2
        expand = lambda a: np.repeat(a, self.group, axis=axis)
        return parts[0].astype(np.float32) * expand(parts[1]) + expand(parts[2])


def numpy_quantizers(store, head_dim):
    if isinstance(store, KIVI):
        return (NumpyQuantizer("channel", store.bits, store.group_size),
                NumpyQuantizer("token", store.bits, min(store.group_size, head_dim)))
    if isinstance(store, Int4):
        return (NumpyQuantizer("token", 4, min(32, head_dim)),) * 2
    return (NumpyQuantizer("int8"),) * 2


class KiviSim:
    """KIVI's cache of one sequence as `llama_kivi.py` keeps it, heads [H, T, D]: the prefill
    rule, then new tokens join the full-precision residual and, after the attention that reads
    them, keys leave it in whole R-blocks and values once more than R are there. Per-token keys
    (int8, int4) leave it as the values do."""

    def __init__(self, store, keys, values):
        self.r, self.blocks = store.residual, store.per_channel_keys
        self.quantize_keys, self.quantize_values = numpy_quantizers(store, keys.shape[2])
        n = keys.shape[1]
        value_count = max(n - self.r, 0)  # values: all but the last R
        key_count = n // self.r * self.r if self.blocks else value_count  # keys: whole R-blocks
        self.key_parts = [self.quantize_keys.quantize(keys[:, :key_count])]
        self.value_parts = [self.quantize_values.quantize(values[:, :value_count])]
        self.keys, self.values = keys[:, key_count:], values[:, value_count:]

    def append(self, keys, values):
        self.keys = np.concatenate([self.keys, keys], axis=1)
        self.values = np.concatenate([self.values, values], axis=1)

    def flush(self):
        while self.blocks and self.keys.shape[1] >= self.r:
            self.key_parts.append(self.quantize_keys.quantize(self.keys[:, :self.r]))
            self.keys = self.keys[:, self.r:]
        if not self.blocks:
            self.key_parts, self.keys = self._slide(self.key_parts, self.keys,
                                                    self.quantize_keys)
        self.value_parts, self.values = self._slide(self.value_parts, self.values,
                                                    self.quantize_values)

    def _slide(self, parts, exact, quantizer):
        due = max(exact.shape[1] - self.r, 0)
        return parts + [quantizer.quantize(exact[:, :due])], exact[:, due:]

    @staticmethod
    def joined(parts):
        return tuple(np.concatenate(arrays, axis=1) for arrays in zip(*parts))

    def dense(self):
        """Keys and values as attention reads them: dequantized, then the exact residual."""
        return (np.concatenate([self.quantize_keys.dense(self.joined(self.key_parts)),
                                self.keys], axis=1),
                np.concatenate([self.quantize_values.dense(self.joined(self.value_parts)),
                                self.values], axis=1))


def attention(queries, keys, values, query_positions, window=None):
    """Exact causal attention in float64 of queries [T, H, g, D] over keys [H, S, D] at
    positions 0..S-1."""
    scores = np.einsum("thgd,hsd->thgs", queries.astype(np.float64), keys) / np.sqrt(
        keys.shape[-1])
    key_positions = np.arange(keys.shape[1])
    visible = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        visible &= query_positions[:, None] - key_positions[None, :] < window
    scores = np.where(visible[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("thgs,hsd->thgd", probs / probs.sum(-1, keepdims=True), values)


# ----------------------------------------------------------------------- quantizers


def outlier_tensor(seed, shape):
    """Random [B, H, T, D] with outlier channels (as KIVI observes in keys) and zero ranges."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x[..., 3] *= 25.0
    x[..., 10] += 8.0
    x[0, 0, :32, 5] = 1.25  # a constant key group (32 tokens of one channel)
    x[0, 1, 7, 32:] = -0.5  # a constant value group (32 channels of one token)
    x[1, 1, 9] = 0.0  # an all-zero token (int8)
    return x


@bit_exact
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_quantizers_match_numpy_kivi_bit_for_bit(bits):
    x = outlier_tensor(bits, (2, 2, 96, 64))
    keys = kp.quantize_per_channel(jnp.asarray(x), bits, 32, jnp.float32)
    values = kp.quantize_per_token(jnp.asarray(x), bits, 32, jnp.float32)
    for b in range(2):
        codes, scale, zero = NumpyQuantizer("channel", bits).quantize(x[b])
        np.testing.assert_array_equal(kp.unpack_codes(keys.codes, bits)[b], codes)
        np.testing.assert_array_equal(keys.scale[b], scale)
        np.testing.assert_array_equal(keys.zero[b], zero)
        # KIVI packs keys along tokens; here along channels, in KIVI's bit order
        np.testing.assert_array_equal(keys.codes[b], kivi_pack(codes, bits))
        codes, scale, zero = NumpyQuantizer("token", bits).quantize(x[b])
        np.testing.assert_array_equal(values.codes[b], kivi_pack(codes, bits))  # KIVI's bytes
        np.testing.assert_array_equal(values.scale[b], scale)
        np.testing.assert_array_equal(values.zero[b], zero)
    np.testing.assert_array_equal(keys.scale[0, 0, 0, 5], 0.0)  # zero range: scale 0,
    np.testing.assert_array_equal(kp.dequantize(keys)[0, 0, :32, 5], 1.25)  # restored exactly


@bit_exact
def test_int8_matches_numpy_absmax_bit_for_bit():
    x = outlier_tensor(7, (2, 2, 48, 64))
    qt = kp.quantize_int8_symmetric(jnp.asarray(x), jnp.float32)
    for b in range(2):
        codes, scale = NumpyQuantizer("int8").quantize(x[b])
        np.testing.assert_array_equal(qt.codes[b], codes)
        np.testing.assert_array_equal(qt.scale[b, ..., 0], scale)
    np.testing.assert_array_equal(kp.dequantize(qt)[1, 1, 9], 0.0)


# ----------------------------------------------------------------------- the cache

HEADS, GROUP, HEAD_DIM = 2, 3, 64
CONTEXTS = (200, 60)  # R = 128: row 0 starts with a quantized key block, row 1 with none
DECODE_STEPS = 70  # row 0 passes 256 (a key flush), row 1 passes 128 and 129
CHUNK, CHUNK_VALID = 140, (140, 130)  # a question: several key blocks fall due at once


@functools.partial(jax.jit, static_argnames=("store", "future", "keep_positions"))
def build(store, context, future, keep_positions):
    return QuantizedKVCache.build(store, context, future, keep_positions)


@functools.partial(jax.jit, static_argnames=("window",))
def step(cache, queries, keys, values, positions, valid, window=None):
    with jax.default_matmul_precision("highest"):  # float32 products, not TF32, on a GPU
        return cache.append(keys, values, positions, valid).attend(queries, positions, window)


def context_cache(keys, values, lengths):
    """A compressed context as `compress` hands it over: kept tokens first, in position order."""
    batch, heads, slots, _ = keys.shape
    slot = np.arange(slots)
    positions = np.where(slot[None, :] < np.asarray(lengths)[:, None], slot, -1)
    return DenseKVCache(jnp.asarray(keys), jnp.asarray(values),
                        jnp.asarray(np.broadcast_to(positions[:, None], (batch, heads, slots)),
                                    jnp.int32),
                        jnp.asarray(np.repeat(np.asarray(lengths)[:, None], heads, 1), jnp.int32))


def cache_parts(qt, row, tokens):
    """The first `tokens` quantized tokens of a sequence in NumpyQuantizer's tuple layout."""
    codes = qt.codes if qt.signed else kp.unpack_codes(qt.codes, qt.bits)
    groups = tokens // qt.group_size if qt.granularity == "per_channel" else tokens
    scale = np.asarray(qt.scale)[row, :, :groups]
    if qt.signed:
        return np.asarray(codes)[row, :, :tokens], scale[..., 0]
    return np.asarray(codes)[row, :, :tokens], scale, np.asarray(qt.zero)[row, :, :groups]


def assert_state_matches(cache: QuantizedKVCache, sims):
    for row, sim in enumerate(sims):
        key_parts, value_parts = sim.joined(sim.key_parts), sim.joined(sim.value_parts)
        n_keys, n_values = key_parts[0].shape[1], value_parts[0].shape[1]
        n = n_values + sim.values.shape[1]
        assert (int(cache.key_lengths[row]), int(cache.value_lengths[row]),
                int(cache.lengths[row])) == (n_keys, n_values, n)
        for got, want in zip(cache_parts(cache.keys, row, n_keys), key_parts):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(cache_parts(cache.values, row, n_values), value_parts):
            np.testing.assert_array_equal(got, want)
        residual = np.asarray(cache.residual_values)[row, :, :n - n_values]
        np.testing.assert_array_equal(residual, sim.values)
        residual_keys = np.asarray(cache.residual_keys)[row, :, n_keys - n_values:n - n_values]
        np.testing.assert_array_equal(residual_keys, sim.keys)


def run_alongside_numpy(store, window=None):
    """Builds a cache from two contexts, decodes DECODE_STEPS tokens one at a time, then appends
    a CHUNK-token question, alongside KiviSim. Yields (cache, sims, engine output [b, t, heads,
    d], NumPy output [b][t, kv_heads, group, d], valid tokens per row) after every step."""
    rng = np.random.default_rng(1)
    slots = 208
    keys, values = (outlier_tensor(s, (2, HEADS, slots, HEAD_DIM)) for s in (2, 3))
    cache = build(store, context_cache(keys, values, CONTEXTS), DECODE_STEPS + CHUNK,
                  window is not None)
    sims = [KiviSim(store, keys[b, :, :n], values[b, :, :n]) for b, n in enumerate(CONTEXTS)]
    yield cache, sims, None, None, None
    lengths = np.array(CONTEXTS)
    for tokens, valid in [(1, (1, 1))] * DECODE_STEPS + [(CHUNK, CHUNK_VALID)]:
        normal = lambda *shape: rng.normal(size=(2, tokens, *shape)).astype(np.float32)
        q, k, v = normal(HEADS * GROUP, HEAD_DIM), normal(HEADS, HEAD_DIM), normal(HEADS, HEAD_DIM)
        positions = lengths[:, None] + np.arange(tokens)
        mask = np.arange(tokens)[None, :] < np.array(valid)[:, None]
        out, cache = step(cache, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          jnp.asarray(positions, jnp.int32), jnp.asarray(mask), window=window)
        expected = []
        for b, sim in enumerate(sims):
            sim.append(k[b, :valid[b]].transpose(1, 0, 2), v[b, :valid[b]].transpose(1, 0, 2))
            grouped = q[b, :valid[b]].reshape(valid[b], HEADS, GROUP, HEAD_DIM)
            expected.append(attention(grouped, *sim.dense(), positions[b, :valid[b]], window))
            sim.flush()
        lengths += np.array(valid)
        yield cache, sims, np.asarray(out), expected, valid


# (store, sliding window); the flush and attention tests share their compiled programs
CASES = [(KIVI(bits=2), None), (KIVI(bits=4), 150), (Int8(), None), (Int4(), 150)]
CASE_IDS = ["kivi2", "kivi4-window", "int8", "int4-window"]


@bit_exact
@pytest.mark.parametrize("store,window", CASES, ids=CASE_IDS)
def test_flush_rule_matches_numpy_kivi_after_every_step(store, window):
    for cache, sims, *_ in run_alongside_numpy(store, window):
        assert_state_matches(cache, sims)
    if store.per_channel_keys:  # the residual ends with whole R-blocks quantized
        assert np.asarray(cache.key_lengths).tolist() == [384, 256]  # 410 and 260 tokens


@pytest.mark.parametrize("store,window", CASES, ids=CASE_IDS)
def test_attention_equals_attention_over_the_dequantized_cache(store, window):
    for _, _, out, expected, valid in list(run_alongside_numpy(store, window))[1:]:
        for b, want in enumerate(expected):
            got = out[b, :valid[b]].reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("store,dtype", [(KIVI(bits=2), jnp.float32), (KIVI(bits=4), jnp.bfloat16),
                                         (Int8(), jnp.bfloat16), (Int4(), jnp.float32)],
                         ids=["kivi2-f32", "kivi4-bf16", "int8-bf16", "int4-f32"])
def test_bytes_held_are_the_packed_size(store, dtype):
    """A 1008-token context (as compress rounds it) with room for 48 more: codes, scales and
    zeros of 1056 tokens, plus R exact tokens of keys and values."""
    batch, slots, future, n = 2, 1008, 48, 1000
    zeros = jnp.zeros((batch, HEADS, slots, HEAD_DIM), dtype)
    cache = build(store, context_cache(zeros, zeros, [n, n]), future, False)
    tokens, size = slots + future, jnp.dtype(dtype).itemsize
    if isinstance(store, Int8):
        per_token = 2 * (HEAD_DIM + size)  # int8 codes and one scale, keys and values
    else:
        group = min(getattr(store, "group_size", 32), HEAD_DIM)
        bits = getattr(store, "bits", 4)
        per_token = 2 * HEAD_DIM * bits // 8 + 2 * 2 * size * HEAD_DIM // group
    theory = batch * HEADS * (tokens * per_token + store.residual * 2 * HEAD_DIM * size)
    assert theory <= cache.nbytes() <= 1.02 * theory
    dense = DenseKVCache.empty(batch, HEADS, tokens, HEAD_DIM, dtype).nbytes()
    assert cache.nbytes() < dense * (0.6 if isinstance(store, Int8) else 0.45)


# ----------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def tiny():
    config, params = converted(tiny_hf_model("llama"))
    return dataclasses.replace(config, max_position_embeddings=1024), params


def test_eviction_then_kivi_quantizes_exactly_the_kept_tokens(tiny):
    """PyramidKV (SnapKV scores, layer-wise budgets) then KIVI: each layer's store holds what
    the eviction kept, the residual exact and the rest within half a quantization step."""
    config, params = tiny
    method = PyramidKV()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (400, 330)]
    compiler = Compiler()
    kv_state = KVState.empty(config, 2, 512, jnp.float32)
    needs = method.needs()
    _, kv_state, observations = prefill(compiler, params, config, prompts, kv_state,
                                        needs=needs)
    budget, lengths = Budget(ratio=0.5), [len(p) for p in prompts]
    compressed = [compress_contexts(compiler, Compression(
                                        method if store is None else Chain(method, store),
                                        budget), config, kv_state, observations, lengths, 16)
                  for store in (None, KIVI(bits=4))]
    for plain, stored in zip(*(state.layers for state in compressed)):
        context = jax.tree.map(np.asarray, getattr(plain, "context", plain))
        n = context.lengths[:, 0]
        assert np.asarray(stored.lengths).tolist() == n.tolist()
        keys, values = (np.asarray(kp.dequantize(x)) for x in (stored.keys, stored.values))
        key_step = np.repeat(np.asarray(stored.keys.scale), 32, axis=2)  # G = 32 tokens
        value_step = np.repeat(np.asarray(stored.values.scale), 16, axis=3)  # head_dim 16
        for b in range(2):
            lk, lv = int(stored.key_lengths[b]), int(stored.value_lengths[b])
            exact = slice(lv, n[b])  # the residual: kept tokens [Lv, n), exactly
            np.testing.assert_array_equal(stored.residual_values[b][:, :n[b] - lv],
                                          context.values[b][:, exact])
            np.testing.assert_array_equal(stored.residual_keys[b][:, lk - lv:n[b] - lv],
                                          context.keys[b][:, lk:n[b]])
            np.testing.assert_array_equal(stored.residual_positions[b][:, :n[b] - lv],
                                          context.positions[b][:, exact])
            for got, want, step, count in [(keys, context.keys, key_step, lk),
                                           (values, context.values, value_step, lv)]:
                error = np.abs(got[b, :, :count] - want[b, :, :count])
                assert np.all(error <= step[b, :, :count] / 2 + 1e-5)
    assert len({int(layer.lengths[0]) for layer in compressed[1].layers}) > 1  # layer-wise


def test_kivi4_generation_decodes_in_one_compiled_program(tiny):
    """200 context tokens and 60 generated: the residual flushes a key block at 256 tokens."""
    config, params = tiny
    prompt = np.random.default_rng(4).integers(3, config.vocab_size, 200).tolist()
    compression = make_compression("kivi4", None)
    compiles, seen_at_token = [], []
    listener = lambda event, *a, **k: (compiles.append(event) if event == BACKEND_COMPILE_EVENT
                                       else None)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        streamed = generate(params, config, [prompt], 60, compression=compression,
                            on_token=lambda t: seen_at_token.append(len(compiles)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(streamed.tokens[0]) == 60 and seen_at_token[-1] == seen_at_token[0]
    looped = generate(params, config, [prompt], 60, compression=compression)
    assert looped.tokens == streamed.tokens
    for layer in looped.kv_state.layers:
        assert isinstance(layer, QuantizedKVCache)
        assert (int(layer.key_lengths[0]), int(layer.lengths[0])) == (256, 259)


# ----------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny Llama as a HF folder with a word-level tokenizer of its 160 ids."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_hf_model("llama")
    model.config.max_position_embeddings = 1024
    model.save_pretrained(folder)
    words = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{f"w{i}": i for i in range(3, 160)}}
    backend = tokenizers.Tokenizer(models.WordLevel(words, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    return folder


def test_cli_generates_with_quantized_stores(tiny_checkpoint):
    context = " ".join(f"w{3 + i % 150}" for i in range(600))
    specs = ["kivi4", "snapkv+kivi2", "int8"]
    run = lambda spec: run_cli(f"--checkpoint={tiny_checkpoint}", f"--context={context}",
                               "--question=w5 w6", f"--compress={spec}", "--max_new_tokens=4")
    parallel = len(specs) if jax.default_backend() == "cpu" else 1  # one process per GPU
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(run, specs))
    for spec, result in zip(specs, results):
        assert result.returncode == 0, (spec, result.stderr)
        before, after = result.stdout.split("context KV ")[1].split(" | ")[0].split(" -> ")
        assert float(after.split()[0]) < 0.5 * float(before.split()[0]), spec


def test_cli_refuses_head_wise_budgets_with_a_store():
    assert_one_line_error(run_cli("--prompt=hi", "--compress=adakv:snapkv+kivi2"), "AdaKV",
                          "snapkv+kivi2")
