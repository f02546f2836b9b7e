"""Compression saves real memory, and compressing nothing changes nothing.

The context's KV bytes after compression equal the theoretical size: the kept tokens' keys and
values, plus at most one block of slots per stream (capacities are rounded up to a block) and,
where the kept tokens share one cache with the tokens to come, the slots kept free for those,
plus the int32 positions of the slots; head-wise (AdaKV's page pool), at most one page per
stream beyond the kept tokens, plus positions, the page table and the lengths."""

import numpy as np
import pytest

from compression.adakv import AdaKV
from compression.base import Budget
from compression.compress import Compression, Plan, compress
from compression.pyramidkv import PyramidKV
from compression.registry import make_compression
from compression.select import BLOCK, round_up
from compression.snapkv import SnapKV
from engine.generation import generate, pad_prompts
from engine.memory import sequence_state_bytes
from models.kv_cache import PagedKVCache
from tests.compression_harness import (RECENT_SLOTS, engine_kept_positions, random_context,
                                       tiny_config)
from tests.hf_reference import converted, tiny_hf_model


@pytest.mark.parametrize("method", [SnapKV(window_size=8), PyramidKV(window_size=8),
                                    AdaKV(SnapKV(window_size=8))], ids=type)
@pytest.mark.parametrize("ratio", [0.5, 0.875])
def test_context_bytes_equal_the_theoretical_size(method, ratio, monkeypatch):
    config = tiny_config(num_layers=3)
    n = 600
    compression = Compression(method, Budget(ratio=ratio))
    captured = {}
    real_compress = compress

    def spy(*args, **kwargs):
        captured["state"] = real_compress(*args, **kwargs)
        return captured["state"]

    monkeypatch.setattr("tests.compression_harness.compress", spy)
    engine_kept_positions(config, compression, random_context(config, 1, n), [n])
    plan = Plan.make(compression, [n], config.num_layers, config.num_kv_heads)
    slot_bytes = 2 * config.head_dim * 4  # float32 key + value
    for layer, kept in zip(captured["state"].layers, plan.n_kept[:, 0]):
        context = getattr(layer, "context", layer)
        free = 0 if hasattr(layer, "context") else RECENT_SLOTS
        kv_bytes = context.keys.nbytes + context.values.nbytes
        theoretical = int(kept) * config.num_kv_heads * slot_bytes
        slots = kv_bytes // slot_bytes
        metadata = context.nbytes() - kv_bytes
        if isinstance(context, PagedKVCache):
            # head-wise: each head's kept tokens rounded up to whole pages, in a pool sized for
            # the worst split of the layer's tokens: at most one page per stream beyond them
            held_pages = int(np.asarray(context.pages_used()).sum())
            assert held_pages * context.page_size * slot_bytes <= kv_bytes
            assert theoretical <= kv_bytes <= (theoretical + config.num_kv_heads
                                               * context.page_size * slot_bytes)
            assert metadata == (slots * 4 + context.page_table.nbytes
                                + context.lengths.nbytes)
            continue
        assert theoretical <= kv_bytes <= (theoretical
                                           + config.num_kv_heads * (BLOCK + free) * slot_bytes)
        assert metadata == slots * 4 + context.lengths.nbytes
    kept_fraction = plan.n_kept.sum() / (n * config.num_layers)
    assert abs(kept_fraction - (1 - ratio)) < 0.01


@pytest.mark.parametrize("spec", ["snapkv", "pyramidkv", "adakv", "h2o"])
def test_ratio_zero_generates_what_no_compression_generates(spec):
    config, params = converted(tiny_hf_model("llama"))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (90, 70)]
    questions = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 9)]
    plain = generate(params, config, prompts, 16, questions=questions).tokens
    zero = generate(params, config, prompts, 16, questions=questions,
                    compression=make_compression(spec, Budget(ratio=0.0))).tokens
    assert zero == plain


@pytest.mark.parametrize("spec,ratio", [("none", None), ("snapkv", 0.5), ("adakv", 0.5),
                                        ("kivi4", None), ("int8", None), ("snapkv+kivi2", 0.5)])
def test_predicted_sequence_bytes_equal_the_state_generation_holds(spec, ratio):
    # The benchmark's memory model sizes a batch from eval_shape of the engine's own state
    # construction; the arrays a real generation holds must have exactly that size.
    config, params = converted(tiny_hf_model("llama"))
    rng = np.random.default_rng(5)
    n, new_tokens = 200, 8
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for _ in range(2)]
    compression = make_compression(spec, None if ratio is None else Budget(ratio=ratio))
    held = generate(params, config, prompts, new_tokens, compression=compression).kv_bytes
    predicted = sequence_state_bytes(config, compression, n, pad_prompts(prompts).shape[1],
                                     round_up(new_tokens), params.embed.dtype)
    assert held == 2 * predicted
