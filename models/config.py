"""Model configuration: one frozen dataclass for Llama 1/2/3/3.1 and Mistral, read from HF
`config.json`, from GGUF metadata, or taken from a named preset.

The config is hashable so jitted functions take it as a static argument.
"""

import dataclasses
from typing import Any

from pallas_kernels.errors import UserError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: a query sees keys at most this many positions back
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Reads a HF `config.json` dict of a LlamaForCausalLM or MistralForCausalLM."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise UserError(f"unsupported model_type {model_type!r} in config.json; "
                        "supported: llama, mistral")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_scaling = None
    rope_theta = hf.get("rope_theta")
    if scaling:
        rope_theta = scaling.get("rope_theta", rope_theta)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position_embeddings"])
        elif rope_type != "default":
            raise UserError(f"unsupported rope scaling {rope_type!r}; supported: llama3, default")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )


def config_from_gguf(metadata: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
    """Reads GGUF metadata (ggml's docs/gguf.md, `llama.*` keys); Mistral GGUFs use `llama` too."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: llama, mistral")

    def key(name, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{name}")
        return value

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    rope_scaling = None
    if metadata.get(f"{arch}.rope.scaling.type") == "llama3":
        raise UserError("GGUF llama3 rope scaling is not supported; convert from HF instead")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(metadata.get(f"{arch}.rope.dimension_count") or hidden // num_heads),
        max_position_embeddings=int(key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=not has_output_tensor,
        sliding_window=metadata.get(f"{arch}.attention.sliding_window"),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(metadata.get("tokenizer.ggml.eos_token_id")),
    )


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling(), bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1000000.0,
        bos_token_id=1, eos_token_ids=(2,)),
}
