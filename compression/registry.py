"""Maps `--compress` names to compression methods.

`NAME` picks a method with its paper's defaults; `WRAPPER:NAME` composes a wrapper (a method that
allocates budgets) with a scorer, e.g. `adakv:snapkv`.
"""

from compression.adakv import AdaKV
from compression.base import Method
from compression.expected_attention import ExpectedAttention
from compression.h2o import H2O
from compression.knorm import KNorm
from compression.pyramidkv import PyramidKV
from compression.random import Random
from compression.snapkv import SnapKV
from compression.streamingllm import StreamingLLM
from compression.tova import TOVA
from engine.errors import UserError

SCORERS: dict[str, type[Method]] = {
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "tova": TOVA,
    "knorm": KNorm,
    "expected_attention": ExpectedAttention,
    "random": Random,
}
WRAPPERS: dict[str, type[Method]] = {"adakv": AdaKV}
NAMES = ["none", *SCORERS, *WRAPPERS]


def get_method(spec: str) -> Method | None:
    """The method named by `spec`, or None for `none`."""
    if spec == "none":
        return None
    parts = spec.split(":")
    unknown = [p for p in parts if p not in SCORERS and p not in WRAPPERS]
    if unknown:
        raise UserError(f"unknown compression method {unknown[0]!r}; available: {', '.join(NAMES)}"
                        " (compose as wrapper:scorer, e.g. adakv:snapkv)")
    if len(parts) == 1:
        return (SCORERS.get(spec) or WRAPPERS[spec])()
    if len(parts) != 2 or parts[0] not in WRAPPERS or parts[1] not in SCORERS:
        raise UserError(f"cannot compose {spec!r}: write wrapper:scorer with a wrapper from "
                        f"{', '.join(WRAPPERS)} and a scorer from {', '.join(SCORERS)}")
    return WRAPPERS[parts[0]](SCORERS[parts[1]]())
