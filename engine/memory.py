"""Predicting device memory before a run, so that a batch that cannot fit is refused up front
with the largest batch that does.

The prediction counts the weights, the KV state held while decoding (one sequence's state, from
the shapes the engine itself builds, times the batch), and the transient peak of prefilling one
group of contexts: its full-size cache before compression, its activations and its logits. It is
an estimate with a safety margin, not an allocator trace.
"""

import dataclasses
import os

import jax

from compression.compress import Compression, compress
from pallas_kernels.errors import UserError
from compression.compress import Plan
from engine.generation import empty_kv_state, new_observations, prefill_capacity
from models.config import ModelConfig

MARGIN_BYTES = 2 * 2**30  # compiler scratch, fragmentation, the runtime's own buffers


def sequence_state_bytes(config: ModelConfig, compression: Compression | None,
                         context_length: int, padded_length: int, after_context: int,
                         dtype) -> int:
    """Bytes of one sequence's KV state while decoding, built by the same functions
    `engine.generation.generate` uses: the uncompressed cache, or what `compress` returns for the
    context (kept tokens, quantized codes with their scales and zeros, the exact recent window,
    slots kept free for the question and the generated tokens, positions). Shapes only
    (`jax.eval_shape`): nothing is allocated or computed."""

    def state():
        capacity = prefill_capacity(padded_length, after_context, compression)
        prefilled = empty_kv_state(config, 1, capacity, dtype)
        if compression is None:
            return prefilled
        needs = compression.compressor.needs()
        observations = (new_observations(needs, config, 1, padded_length) if needs.any()
                        else None)
        plan = Plan.make(compression, [context_length], config.num_layers, config.num_kv_heads)
        return compress(compression.compressor, config, prefilled, observations,
                        plan.budgets(compression.budget, [context_length], after_context),
                        compression.params)

    return jax.eval_shape(state).nbytes()


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    config: ModelConfig
    weight_bytes: int
    itemsize: int  # bytes per KV and activation element
    padded_length: int  # context slots of the prefill cache
    sequence_bytes: int  # one sequence's KV state while decoding (`sequence_state_bytes`)
    compressed: bool  # the prefill fills a full-size cache that compression then replaces

    def slot_bytes(self) -> int:
        """One slot of one (layer, kv-head) stream: key, value and position."""
        return 2 * self.config.head_dim * self.itemsize + 4

    def decode_state_bytes(self, batch: int) -> int:
        return batch * self.sequence_bytes

    def prefill_bytes(self, group: int) -> int:
        """The transient peak of prefilling `group` contexts in one fused pass."""
        c = self.config
        tokens = group * self.padded_length
        activations = tokens * (4 * c.hidden_size + 4 * c.intermediate_size
                                + 2 * c.num_heads * c.head_dim) * self.itemsize
        full_cache = (tokens * c.num_layers * c.num_kv_heads * self.slot_bytes()
                      if self.compressed else 0)
        return full_cache + activations + group * c.vocab_size * 4

    def peak_bytes(self, batch: int, group: int) -> int:
        return (self.weight_bytes + self.decode_state_bytes(batch)
                + self.prefill_bytes(min(group, batch)) + MARGIN_BYTES)

    def largest_batch(self, limit_bytes: int, group: int) -> int:
        batch = 0
        while self.peak_bytes(batch + 1, group) <= limit_bytes:
            batch += 1
        return batch

    def check(self, batch: int, group: int, limit_bytes: int) -> None:
        need = self.peak_bytes(batch, group)
        if need > limit_bytes:
            raise UserError(
                f"batch {batch} needs about {need / 2**30:.1f} GiB of the device's "
                f"{limit_bytes / 2**30:.1f} GiB; the largest batch that fits is "
                f"{self.largest_batch(limit_bytes, group)}")


def device_memory_bytes(memory_gb: float | None) -> int:
    """`memory_gb` if given, else the device's memory as JAX reports it, else (a CPU, whose
    device reports no memory) the host's physical memory."""
    if memory_gb:
        return int(memory_gb * 2**30)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if jax.devices()[0].platform == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise UserError("cannot read the device's memory size; pass --memory_gb")
