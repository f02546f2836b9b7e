"""Command line: convert a GGUF file or a HF checkpoint folder into an orbax checkpoint that
`--checkpoint` loads directly (parameters already in the engine's layout, dequantized).

    python -m engine.convert --source model.gguf --output converted/ --dtype bfloat16

The output folder holds `engine_config.json` (the model config), `params/` (orbax) and the
tokenizer (tokenizer.json, tokenizer_config.json, generation_config.json).
"""

import jax.numpy as jnp
from absl import flags

from checkpoints_convert.load import convert_checkpoint
from engine import cli
from pallas_kernels.errors import UserError

_SOURCE = flags.DEFINE_string("source", None, "GGUF file or HF folder (default: SmolLM2).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")


def run() -> None:
    if not _OUTPUT.value:
        raise UserError("give --output, the folder to write")
    convert_checkpoint(_SOURCE.value, _OUTPUT.value, jnp.dtype(_DTYPE.value))
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.main(run)
