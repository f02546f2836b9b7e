"""Where a decode step's time goes: times the pieces of one step in a preset's shape (default
Llama-3.1-8B: 32 layers, 8 kv-heads, head_dim 128, bf16) at a given cache length, each repeated
for all layers inside one jitted loop, against the bytes each must move.

    python -m benchmarks.decode_breakdown --context_length=32768 [--capacities=32800,33024]
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from engine.generation import DecodeState, decode_loop, decode_step
from models.kv_cache import DenseKVCache, KVState
from engine.sampling import Sampling
from models.config import PRESETS
from models.params import init_random_params

_CONTEXT = flags.DEFINE_integer("context_length", 32768, "Cache slots per stream.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Sequences.")
_PRESET = flags.DEFINE_enum("preset", "llama-3.1-8b", list(PRESETS), "Model shape.")
_CAPACITIES = flags.DEFINE_list("capacities", [], "Also time the decode loop with caches of "
                                "these many slots (64 of them free), e.g. 32800,33024.")


def timed(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv):
    del argv
    config = PRESETS[_PRESET.value]
    config = type(config)(**{**config.__dict__, "eos_token_ids": ()})
    b, c = _BATCH.value, _CONTEXT.value
    h, d, layers = config.num_kv_heads, config.head_dim, config.num_layers
    key = jax.random.key(0)
    cache = DenseKVCache(
        keys=jax.random.normal(key, (b, h, c, d), jnp.bfloat16),
        values=jax.random.normal(key, (b, h, c, d), jnp.bfloat16),
        positions=jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, h, c)),
        lengths=jnp.full((b, h), c - 64, jnp.int32))
    q = jax.random.normal(key, (b, 1, config.num_heads, d), jnp.bfloat16)
    k_new = jax.random.normal(key, (b, 1, h, d), jnp.bfloat16)
    pos = jnp.full((b, 1), c - 64, jnp.int32)
    valid = jnp.ones((b, 1), bool)
    kv_bytes = 2 * cache.keys.nbytes

    @jax.jit
    def attend_all_layers(cache, q):
        def body(i, acc):
            out, _ = cache.attend(q + acc.astype(q.dtype), pos)
            return acc + out.astype(jnp.float32) * 1e-3
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(q.shape, jnp.float32))

    @jax.jit
    def einsum_all_layers(cache, q):
        def body(i, acc):
            qg = (q + acc.astype(q.dtype)).reshape(b, 1, h, -1, d)
            s = jnp.einsum("bthgd,bhsd->bhgts", qg, cache.keys, preferred_element_type=jnp.float32)
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("bhgts,bhsd->bthgd", p.astype(cache.values.dtype), cache.values,
                           preferred_element_type=jnp.float32)
            return acc + o.reshape(q.shape) * 1e-3
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(q.shape, jnp.float32))

    @jax.jit
    def append_all_layers(cache):
        def body(i, cache):
            return dataclasses_replace_lengths(cache.append(k_new, k_new, pos, valid))
        return jax.lax.fori_loop(0, layers, body, cache)

    def dataclasses_replace_lengths(new):
        return DenseKVCache(new.keys, new.values, new.positions, new.lengths - 1)

    append_donated = jax.jit(append_all_layers.__wrapped__, donate_argnums=0)

    rows = []
    rows.append(("attend (engine), 32 layers", timed(attend_all_layers, cache, q), kv_bytes * layers))
    rows.append(("einsum attention, 32 layers", timed(einsum_all_layers, cache, q),
                 kv_bytes * layers))
    t = timed(lambda: append_donated(jax.tree.map(jnp.copy, cache)), repeats=3) - timed(
        lambda: jax.tree.map(jnp.copy, cache), repeats=3)
    rows.append(("append (donated), 32 layers", t, 0))

    params = jax.jit(init_random_params, static_argnums=(0, 2))(config, key, jnp.bfloat16)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params.embed.nbytes
    state = KVState(layers=tuple(jax.tree.map(jnp.copy, cache) for _ in range(layers)),
                    next_positions=jnp.full((b,), c - 64, jnp.int32))
    decode = DecodeState(tokens=jnp.zeros((b, 8), jnp.int32), step=jnp.int32(1),
                         done=jnp.zeros((b,), bool), kv_state=state, key=jax.random.key(1))
    step = jax.jit(lambda p, s: decode_step(p, config, Sampling(), s), donate_argnums=1)
    def best_step_seconds(state):
        s = step(params, state)
        jax.block_until_ready(s)
        best = float("inf")
        for _ in range(5):
            s = DecodeState(s.tokens, jnp.int32(1), s.done, s.kv_state, s.key)
            start = time.perf_counter()
            s = step(params, s)
            jax.block_until_ready(s)
            best = min(best, time.perf_counter() - start)
        return best

    rows.append(("whole decode step (jit, donated)", best_step_seconds(decode),
                 weight_bytes + kv_bytes * layers))
    empty = KVState(layers=tuple(DenseKVCache(cache.keys[:, :, :64], cache.values[:, :, :64],
                                              cache.positions[:, :, :64], cache.lengths * 0)
                                 for _ in range(layers)),
                    next_positions=jnp.zeros((b,), jnp.int32))
    tiny = DecodeState(tokens=jnp.zeros((b, 8), jnp.int32), step=jnp.int32(1),
                       done=jnp.zeros((b,), bool), kv_state=empty, key=jax.random.key(1))
    best = best_step_seconds(tiny)
    rows.append(("decode step, 64-slot cache", best, weight_bytes))
    steps = 16

    def loop_state(capacity):
        """A decode state with `capacity` cache slots per stream, 64 of them free."""
        filled = capacity - 64
        layer = lambda: DenseKVCache(
            keys=jnp.ones((b, h, capacity, d), jnp.bfloat16),
            values=jnp.ones((b, h, capacity, d), jnp.bfloat16),
            positions=jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (b, h, capacity)),
            lengths=jnp.full((b, h), filled, jnp.int32))
        return DecodeState(tokens=jnp.zeros((b, steps + 1), jnp.int32), step=jnp.int32(1),
                           done=jnp.zeros((b,), bool), key=jax.random.key(1),
                           kv_state=KVState(layers=tuple(layer() for _ in range(layers)),
                                            next_positions=jnp.full((b,), filled, jnp.int32)))

    def per_step_seconds(run, capacity):
        """Best of three runs of `steps` steps from a fresh state, after a compiling run."""
        jax.block_until_ready(run(loop_state(capacity)))
        best = float("inf")
        for _ in range(3):
            s = loop_state(capacity)
            jax.block_until_ready(s)
            start = time.perf_counter()
            jax.block_until_ready(run(s))
            best = min(best, time.perf_counter() - start)
        return best / steps

    def python_loop(s):
        for _ in range(steps):
            s = step(params, s)
        return s

    looped = jax.jit(lambda p, s: decode_loop(p, config, Sampling(), s), donate_argnums=1)
    while_loop = lambda s: looped(params, s)
    loop_bytes = lambda capacity: weight_bytes + 2 * layers * b * h * capacity * d * 2
    rows.append(("per step, lax.while_loop of 16", per_step_seconds(while_loop, c), loop_bytes(c)))
    for capacity in map(int, _CAPACITIES.value):
        rows.append((f"per step, while_loop, {capacity} slots",
                     per_step_seconds(while_loop, capacity), loop_bytes(capacity)))
    rows.append(("per step, Python loop of 16 jitted steps", per_step_seconds(python_loop, c),
                 loop_bytes(c)))
    for name, seconds, nbytes in rows:
        rate = f"{nbytes / seconds / 1e12:.2f} TB/s" if nbytes else ""
        print(f"{name:40s} {1e3 * seconds:8.2f} ms  {rate}")


if __name__ == "__main__":
    app.run(main)
