"""Predicting device memory before a run, so that a batch that cannot fit is refused up front
with the largest batch that does.

The prediction counts the weights, the KV state held while decoding (every layer's slots, with
positions), and the transient peak of prefilling one group of contexts: its full-size cache
before compression, its activations and its logits. It is an estimate with a safety margin, not
an allocator trace.
"""

import dataclasses

from compression.select import capacity_for
from engine.errors import UserError
from models.config import ModelConfig

MARGIN_BYTES = 2 * 2**30  # compiler scratch, fragmentation, the runtime's own buffers


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    config: ModelConfig
    weight_bytes: int
    itemsize: int  # bytes per KV and activation element
    padded_length: int  # context slots of the prefill cache
    after_context: int  # slots for the question and generated tokens
    context_slots: tuple[int, ...] | None  # per layer after compression; None: uncompressed

    def slot_bytes(self) -> int:
        """One slot of one (layer, kv-head) stream: key, value and position."""
        return 2 * self.config.head_dim * self.itemsize + 4

    def decode_state_bytes(self, batch: int) -> int:
        c = self.config
        if self.context_slots is None:
            slots = [capacity_for(self.padded_length + self.after_context)] * c.num_layers
        else:
            slots = [capacity_for(s + self.after_context) for s in self.context_slots]
        return batch * c.num_kv_heads * self.slot_bytes() * sum(slots)

    def prefill_bytes(self, group: int) -> int:
        """The transient peak of prefilling `group` contexts in one fused pass."""
        c = self.config
        tokens = group * self.padded_length
        activations = tokens * (4 * c.hidden_size + 4 * c.intermediate_size
                                + 2 * c.num_heads * c.head_dim) * self.itemsize
        full_cache = 0 if self.context_slots is None else (
            tokens * c.num_layers * c.num_kv_heads * self.slot_bytes())
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
