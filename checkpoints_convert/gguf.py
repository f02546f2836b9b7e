"""Pure-numpy reader for GGUF files (llama.cpp's checkpoint format).

File layout, from the spec (ggml `docs/gguf.md`): little-endian header `"GGUF"`, uint32 version,
uint64 tensor count, uint64 key/value count; the key/value pairs; one info record per tensor
(name, ggml dims innermost-first, ggml type, offset into the data section); padding to
`general.alignment` (default 32); the tensor data. Quantized blocks follow `block_q4_0`, `block_q4_1`,
`block_q8_0`, `block_q4_K` and `block_q6_K` in ggml's `ggml-common.h`.

The file is memory-mapped; `GGUFFile.tensor` dequantizes one tensor on demand to float32, shaped
numpy row-major (the reversed ggml dims), which is the orientation of the matching HF weight.
"""

import dataclasses
import math
import os
import struct
from typing import Any, Callable

import numpy as np

from pallas_kernels.errors import UserError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)

# ggml type id -> (name, elements per block, bytes per block), from ggml.h / ggml.c type traits.
_GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# Metadata value types (gguf.md `gguf_metadata_value_type`); 8 is STRING, 9 is ARRAY.
_STRING, _ARRAY = 8, 9
_SCALAR_DTYPES = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"),
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy row-major: reversed ggml dims
    ggml_type: str
    offset: int  # absolute byte offset of the tensor data in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensor_infos: dict[str, TensorInfo]
    _data: np.ndarray = dataclasses.field(repr=False, compare=False)  # the whole file, mapped as uint8

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 (F32 data is returned as a read-only view of the file)."""
        if name not in self.tensor_infos:
            raise UserError(f"{self.path}: no tensor named {name!r}")
        info = self.tensor_infos[name]
        if info.ggml_type not in _DEQUANTIZE:
            raise UserError(
                f"{self.path}: tensor {name!r} has ggml type {info.ggml_type}, which this reader "
                f"cannot dequantize (supported: {', '.join(_DEQUANTIZE)})"
            )
        raw = self._data[info.offset : info.offset + info.nbytes]
        block_size, type_size = _BLOCK_SIZES[info.ggml_type]
        blocks = raw.reshape(-1, type_size) if block_size > 1 else raw
        return _DEQUANTIZE[info.ggml_type](blocks).reshape(info.shape)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header, metadata and tensor infos of a GGUF file; tensor data stays on disk."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    if os.path.getsize(path) < 4:
        raise UserError(f"{path}: not a GGUF file (only {os.path.getsize(path)} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(path, memoryview(data))
    magic = bytes(cur.take(4))
    if magic != _MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {magic!r}, expected {_MAGIC!r})")
    version = cur.scalar(4)
    if version not in _SUPPORTED_VERSIONS:
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise UserError(f"{path}: unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)

    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar(4), key)

    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
        raw_infos.append((name, dims, cur.scalar(4), cur.scalar(10)))

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise UserError(f"{path}: general.alignment must be a positive integer, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    infos = {}
    for name, dims, type_id, offset in raw_infos:
        infos[name] = _tensor_info(path, name, dims, type_id, data_start + offset, data.size)
    return GGUFFile(path, metadata, infos, data)


def _tensor_info(
    path: str, name: str, dims: list[int], type_id: int, offset: int, file_size: int
) -> TensorInfo:
    if type_id not in _GGML_TYPES:
        raise UserError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}")
    type_name, block_size, type_size = _GGML_TYPES[type_id]
    if dims and dims[0] % block_size:
        raise UserError(
            f"{path}: tensor {name!r} ({type_name}) has inner dim {dims[0]}, "
            f"not a multiple of the block size {block_size}"
        )
    nbytes = math.prod(dims) // block_size * type_size
    if offset + nbytes > file_size:
        raise UserError(
            f"{path}: truncated GGUF file: tensor {name!r} needs bytes up to {offset + nbytes} "
            f"but the file has {file_size}"
        )
    return TensorInfo(name, tuple(reversed(dims)), type_name, offset, nbytes)


class _Cursor:
    """Sequential little-endian reads over the mapped file, failing cleanly at its end."""

    def __init__(self, path: str, buf: memoryview):
        self.path, self.buf, self.pos = path, buf, 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise UserError(
                f"{self.path}: truncated GGUF file: header needs {self.pos + n} bytes "
                f"but the file has {len(self.buf)}"
            )

    def take(self, n: int) -> memoryview:
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, vtype: int) -> Any:
        dtype = _SCALAR_DTYPES[vtype]
        return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()

    def string(self) -> str:
        raw = self.take(struct.unpack("<Q", self.take(8))[0])
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: invalid UTF-8 string at byte {self.pos - len(raw)}") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            elem_type, count = self.scalar(4), self.scalar(10)
            if elem_type in _SCALAR_DTYPES:
                dtype = _SCALAR_DTYPES[elem_type]
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).copy()
            self.need(count * 8)  # every string or array takes at least 8 bytes
            return [self.value(elem_type, key) for _ in range(count)]
        if vtype in _SCALAR_DTYPES:
            return self.scalar(vtype)
        raise UserError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of each block, as a float32 column."""
    return blocks[:, start : start + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray, axis: int) -> np.ndarray:
    """Unpack packed 4-bit values into a new `axis` of size 2: low nibbles, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=axis)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qs[16]: element j is the low nibble of qs[j], element j+16 its high nibble; x = d*(q-8).
    q = _nibbles(blocks[:, 2:], axis=1).reshape(len(blocks), 32).astype(np.float32) - 8
    return _f16(blocks, 0) * q


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16, m: f16, qs[16] as in Q4_0; x = d*q + m.
    q = _nibbles(blocks[:, 4:], axis=1).reshape(len(blocks), 32).astype(np.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qs: int8[32]; x = d*q.
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d, dmin: f16; scales[12]: eight 6-bit (scale, min) pairs; qs[128]: in each 64-element chunk the
    # low nibbles of 32 bytes are one sub-block of 32, their high nibbles the next; x = d*sc*q - dmin*m.
    n = len(blocks)
    a, b, c = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1).astype(np.float32)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1).astype(np.float32)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32), axis=2).reshape(n, 8, 32).astype(np.float32)
    scale, offset = _f16(blocks, 0) * sc, _f16(blocks, 2) * mn
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(n, 256)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql[128]: low 4 bits, qh[64]: high 2 bits, scales: int8[16] (one per 16 elements), d: f16.
    # Each 128-element half h uses ql[64h:64h+64] and qh[32h:32h+32]: its four 32-element quarters
    # take the low nibbles of ql[0:32], ql[32:64], then the high nibbles, and bits 0-1, 2-3, 4-5, 6-7
    # of qh; x = d*scale*(q-32).
    n = len(blocks)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 2, 32), axis=2).reshape(n, 2, 4, 32)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(np.float32) - 32).reshape(n, 16, 16)
    scale = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return (scale[:, :, None] * q).reshape(n, 256)


_BLOCK_SIZES = {name: (block_size, type_size) for name, block_size, type_size in _GGML_TYPES.values()}
_DEQUANTIZE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": lambda raw: raw.view("<f4"),
    "F16": lambda raw: raw.view("<f2").astype(np.float32),
    "BF16": lambda raw: (raw.view("<u2").astype(np.uint32) << 16).view(np.float32),
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q6_K": _q6_k,
}
