"""Read a Hugging Face checkpoint directory: `config.json` plus safetensors weights.

Safetensors layout (huggingface/safetensors README, "Format"): an 8-byte little-endian header
length N, N bytes of JSON mapping each tensor name to {dtype, shape, data_offsets: [begin, end]}
(offsets relative to the byte after the header; an optional "__metadata__" entry), then the raw
little-endian row-major data. Weights are either one `model.safetensors` or shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).

We parse the header ourselves rather than use `safetensors.numpy`, whose numpy backend cannot hold
bfloat16 (the usual HF dtype); tensors come back as read-only views of memory-mapped files, so
nothing is read from disk until it is used.
"""

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from checkpoints_convert.json_file import read_json
from pallas_kernels.errors import UserError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def read_hf_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return (config.json as a dict, {tensor name: array}) for an HF model directory."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint directory not found: {directory}")
    config = read_json(os.path.join(directory, "config.json"))
    single = os.path.join(directory, _SINGLE_FILE)
    if os.path.isfile(single):
        return config, read_safetensors(single)
    index_path = os.path.join(directory, _INDEX_FILE)
    if not os.path.isfile(index_path):
        raise UserError(f"{directory}: no weights found (expected {_SINGLE_FILE} or {_INDEX_FILE})")
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: no 'weight_map' object")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise UserError(f"{index_path} lists shard {shard!r}, which is missing from {directory}")
        tensors.update(read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        example = f"{missing[0]!r} in {weight_map[missing[0]]!r}"
        raise UserError(f"{index_path} lists {len(missing)} tensor(s) its shards lack, e.g. {example}")
    return config, tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as read-only views of the memory-mapped file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise UserError(
                f"{path}: truncated safetensors file: header length {header_len} exceeds the file size {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: _tensor(path, name, entry, data, 8 + header_len) for name, entry in header.items()}


def _tensor(path: str, name: str, entry: Any, data: np.ndarray, data_start: int) -> np.ndarray:
    try:
        dtype_name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
    if dtype_name not in _DTYPES:
        supported = ", ".join(_DTYPES)
        raise UserError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}; supported: {supported}"
        )
    dtype = _DTYPES[dtype_name]
    if min(shape, default=0) < 0 or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
        raise UserError(
            f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not fit {dtype_name}{list(shape)}"
        )
    if data_start + end > data.size:
        raise UserError(
            f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end} "
            f"but the file has {data.size}"
        )
    count = (end - begin) // dtype.itemsize
    return np.frombuffer(data, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
