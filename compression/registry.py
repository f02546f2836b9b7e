"""Maps `--compress` names to compression methods.

`NAME` picks a method with its paper's defaults; `WRAPPER:NAME` composes a wrapper (a method that
allocates budgets) with a scorer, e.g. `adakv:snapkv`; `EVICTION+STORE` stores what an eviction
method keeps in a store (quantized, paged), e.g. `snapkv+kivi2`; a store alone keeps everything.
"""

import functools
from typing import Callable

from compression.adakv import AdaKV
from compression.base import Budget, Chain, Compressor, KeepAll, Scorer, Store
from compression.compress import Compression
from compression.decode_eviction import DecodeEviction
from compression.expected_attention import ExpectedAttention
from compression.h2o import H2O
from compression.int4 import Int4
from compression.int8 import Int8
from compression.kivi import KIVI
from compression.knorm import KNorm
from compression.pyramidkv import PyramidKV
from compression.quest import Quest
from compression.random import Random
from compression.snapkv import SnapKV
from compression.streamingllm import StreamingLLM
from compression.tova import TOVA
from pallas_kernels.errors import UserError

SCORERS: dict[str, type[Scorer]] = {
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "tova": TOVA,
    "knorm": KNorm,
    "expected_attention": ExpectedAttention,
    "random": Random,
}
WRAPPERS: dict[str, type[Scorer]] = {"adakv": AdaKV}
STORES: dict[str, Callable[[], Store]] = {
    "quest": Quest,
    "kivi2": functools.partial(KIVI, bits=2),
    "kivi4": functools.partial(KIVI, bits=4),
    "int8": Int8,
    "int4": Int4,
}
NAMES = ["none", *SCORERS, *WRAPPERS, *STORES]


def parse(spec: str) -> tuple[Scorer | None, Store | None]:
    """(eviction method or None, store or None) named by `spec`."""
    eviction, plus, store = spec.partition("+")
    if not plus and spec in STORES:
        return None, STORES[spec]()
    if plus and store not in STORES:
        raise UserError(f"unknown store {store!r} after '+'; available: {', '.join(STORES)}")
    return get_method(eviction), STORES[store]() if plus else None


def get_method(spec: str) -> Scorer | None:
    """The method named by `spec`, or None for `none`."""
    if spec == "none":
        return None
    parts = spec.split(":")
    unknown = [p for p in parts if p not in SCORERS and p not in WRAPPERS and p not in STORES]
    if unknown:
        raise UserError(f"unknown compression method {unknown[0]!r}; available: {', '.join(NAMES)}"
                        " (compose as wrapper:scorer, e.g. adakv:snapkv)")
    if len(parts) == 1 and spec in STORES:
        raise UserError(f"{spec!r} is a store; compose it after an eviction method with '+' "
                        "or use it alone")
    if len(parts) == 1:
        return (SCORERS.get(spec) or WRAPPERS[spec])()
    if len(parts) != 2 or parts[0] not in WRAPPERS or parts[1] not in SCORERS:
        raise UserError(f"cannot compose {spec!r}: write wrapper:scorer with a wrapper from "
                        f"{', '.join(WRAPPERS)} and a scorer from {', '.join(SCORERS)}")
    return WRAPPERS[parts[0]](SCORERS[parts[1]]())


def make_compressor(spec: str, decode_eviction: bool = False) -> Compressor | None:
    """The compressor named by `spec` (None for `none`); with `decode_eviction` the method runs
    its decode-time eviction. A store alone keeps every token (`KeepAll` then the store)."""
    method, store = parse(spec)
    if method is None and store is None:
        return None
    if decode_eviction:
        if store is not None:
            raise UserError("decode-time eviction does not compose with a store")
        return DecodeEviction(method)
    if store is None:
        return method
    return Chain(method or KeepAll(), store)


def make_compression(spec: str, budget: Budget | None, decode_eviction: bool = False):
    """The `Compression` named by `spec` with `budget` (None for `none`). A store alone keeps
    every token; its budget (if any) is the store's own, e.g. Quest's tokens read per step."""
    compressor = make_compressor(spec, decode_eviction)
    if compressor is None:
        if budget is not None:
            raise UserError("--compression_ratio and --kv_budget need a --compress method")
        return None
    return Compression(compressor, budget or Budget(ratio=0.0))
