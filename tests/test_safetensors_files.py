"""HF checkpoint directories written with the `safetensors` library read back through our parser."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from checkpoints_convert.safetensors_files import read_hf_checkpoint
from pallas_kernels.errors import UserError

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(8).astype(np.float16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((12, 8)).astype(np.float32),
        "model.layers.1.mlp.up_proj.weight": rng.standard_normal((12, 8)).astype(np.float16),
        "model.step": np.array(7, np.int64),
    }


def _bf16_tensors():
    generator = torch.Generator().manual_seed(0)
    return {"lm_head.weight": torch.randn(4, 8, generator=generator).to(torch.bfloat16)}


def _expected_bf16(torch_tensors):
    return {name: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for name, t in torch_tensors.items()}


def _write_dir(path, config=CONFIG):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name  # bit-exact, whatever the dtype


def test_single_file_checkpoint_round_trips_f32_f16_bf16(tmp_path):
    directory = _write_dir(tmp_path / "model")
    numpy_tensors, bf16 = _tensors(), _bf16_tensors()
    safetensors.torch.save_file({**{k: torch.from_numpy(v) for k, v in numpy_tensors.items()}, **bf16},
                                directory / "model.safetensors", metadata={"format": "pt"})

    config, tensors = read_hf_checkpoint(directory)

    assert config == CONFIG
    _assert_same(tensors, {**numpy_tensors, **_expected_bf16(bf16)})
    lm_head = tensors["lm_head.weight"]
    np.testing.assert_array_equal(lm_head.astype(np.float32), bf16["lm_head.weight"].float().numpy())
    assert not tensors["model.embed_tokens.weight"].flags.writeable  # a view of the mapped file


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    directory = _write_dir(tmp_path / "model")
    shards = {"model-00001-of-00002.safetensors": dict(list(_tensors().items())[:2]),
              "model-00002-of-00002.safetensors": dict(list(_tensors().items())[2:])}
    weight_map = {}
    for shard, shard_tensors in shards.items():
        safetensors.numpy.save_file(shard_tensors, directory / shard)
        weight_map.update(dict.fromkeys(shard_tensors, shard))
    bf16 = _bf16_tensors()
    safetensors.torch.save_file(bf16, directory / "extra.safetensors")
    weight_map.update(dict.fromkeys(bf16, "extra.safetensors"))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    config, tensors = read_hf_checkpoint(directory)

    assert config == CONFIG
    _assert_same(tensors, {**_tensors(), **_expected_bf16(bf16)})


def test_index_pointing_at_missing_shard_is_reported(tmp_path):
    directory = _write_dir(tmp_path / "model")
    safetensors.numpy.save_file(_tensors(), directory / "model-00001-of-00002.safetensors")
    weight_map = {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="lists shard 'model-00002-of-00002.safetensors', which is missing"):
        read_hf_checkpoint(directory)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(tmp_path):
    directory = _write_dir(tmp_path / "model")
    safetensors.numpy.save_file(_tensors(), directory / "shard.safetensors")
    index = {"weight_map": {"ghost": "shard.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"lists 1 tensor\(s\) its shards lack, e.g. 'ghost' in 'shard"):
        read_hf_checkpoint(directory)


def test_truncated_safetensors_is_reported(tmp_path):
    directory = _write_dir(tmp_path / "model")
    weights = directory / "model.safetensors"
    safetensors.numpy.save_file(_tensors(), weights)
    data = weights.read_bytes()

    weights.write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"truncated safetensors file: tensor '.+' ends at byte \d+ but"):
        read_hf_checkpoint(directory)
    weights.write_bytes(data[:40])
    with pytest.raises(UserError, match="truncated safetensors file: header length"):
        read_hf_checkpoint(directory)
    weights.write_bytes(data[:5])
    with pytest.raises(UserError, match="truncated safetensors file"):
        read_hf_checkpoint(directory)


def test_corrupt_header_is_reported(tmp_path):
    directory = _write_dir(tmp_path / "model")
    weights = directory / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(UserError, match=r"tensor 'w': data_offsets \[0, 12\] do not fit F32\[2, 2\]"):
        read_hf_checkpoint(directory)
    weights.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(UserError, match="corrupt safetensors header"):
        read_hf_checkpoint(directory)
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(UserError, match="unsupported dtype 'C64'; supported: F64, F32"):
        read_hf_checkpoint(directory)


def test_missing_directory_config_or_weights_is_reported(tmp_path):
    with pytest.raises(UserError, match="checkpoint directory not found"):
        read_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing config.json"):
        read_hf_checkpoint(tmp_path / "empty")
    directory = _write_dir(tmp_path / "model")
    with pytest.raises(UserError, match="no weights found"):
        read_hf_checkpoint(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        read_hf_checkpoint(directory)
