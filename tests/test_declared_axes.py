"""The parameter declaration (`models.params.declare_params`) is the one statement of shapes and
logical axes: random init, checkpoint loading, the abstract tree and the byte count all agree with
it, and a checkpoint tensor that disagrees is refused with one line naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints_convert.load as load
from checkpoints_convert.load import load_checkpoint
from checkpoints_convert.to_params import params_from_hf
from models.config import PRESETS, ModelConfig, config_from_hf
from models.params import (ParamInfo, abstract_params, declare_params, declared_param_bytes,
                           init_random_params, logical_axes, param_bytes)
from pallas_kernels.errors import UserError
from tests.hf_reference import tiny_hf_model

AXIS_NAMES = {"vocab", "embed", "qkv", "heads", "kv_heads", "mlp"}
UNTIED = ModelConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)


def declared_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    return [info.shape for info in jax.tree.leaves(declare_params(config))]


def shapes(params) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("config", [UNTIED, PRESETS["smollm2-135m"], PRESETS["llama-3.1-8b"]],
                         ids=["untied", "smollm2", "llama-3.1-8b"])
def test_random_init_and_abstract_tree_have_the_declared_shapes(config):
    params = jax.eval_shape(lambda: init_random_params(config, jax.random.key(0), jnp.bfloat16))
    abstract = abstract_params(config, jnp.bfloat16)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert shapes(params) == shapes(abstract) == declared_shapes(config)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(abstract))
    assert declared_param_bytes(config, jnp.bfloat16) == param_bytes(params)


def test_default_gguf_checkpoint_loads_in_the_declared_shapes():
    checkpoint = load_checkpoint(None)
    assert shapes(checkpoint.params) == declared_shapes(checkpoint.config)
    assert jax.tree.structure(checkpoint.params) == jax.tree.structure(
        abstract_params(checkpoint.config, jnp.float32))


@pytest.mark.parametrize("config", [UNTIED, PRESETS["smollm2-135m"]], ids=["untied", "tied"])
def test_every_leaf_has_one_logical_axis_name_per_dimension(config):
    seen = []

    def check(x, axes):
        assert isinstance(axes, tuple) and len(axes) == x.ndim
        seen.extend(axes)
        return x

    jax.tree.map(check, abstract_params(config, jnp.float32), logical_axes(config))
    assert set(seen) <= AXIS_NAMES
    fused = declare_params(config).layers[0].wqkv
    assert set(fused.part_axes().values()) == {("embed", "heads"), ("embed", "kv_heads")}


def test_abstract_params_takes_one_sharding_per_leaf_from_the_axes():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    per_leaf = jax.tree.map(lambda info: device, declare_params(UNTIED),
                            is_leaf=lambda x: isinstance(x, ParamInfo))
    abstract = abstract_params(UNTIED, jnp.float32, per_leaf)
    assert all(x.sharding == device for x in jax.tree.leaves(abstract))


@pytest.fixture(scope="module")
def hf_tensors():
    model = tiny_hf_model("llama")
    config = config_from_hf(model.config.to_dict())
    return config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight",
                                  "model.layers.0.post_attention_layernorm.weight",
                                  "model.embed_tokens.weight", "lm_head.weight"])
def test_a_planted_wrong_shape_hf_tensor_is_refused_with_one_line(hf_tensors, name):
    config, tensors = hf_tensors
    assert shapes(params_from_hf(config, tensors, np.float32)) == declared_shapes(config)
    right = tensors[name].shape
    wrong = (right[0] + 1, *right[1:])
    planted = {**tensors, name: np.zeros(wrong, np.float32)}
    with pytest.raises(UserError) as error:
        params_from_hf(config, planted, np.float32)
    message = str(error.value)
    assert "\n" not in message
    assert name in message and str(wrong) in message and str(right) in message


def test_a_planted_wrong_shape_gguf_tensor_is_refused_with_one_line(monkeypatch):
    name = "blk.3.attn_q.weight"
    read = load.read_gguf

    def read_with_planted_tensor(path):
        gguf = read(path)
        real = gguf.tensor

        def tensor(tensor_name):
            w = real(tensor_name)
            return w[:-2] if tensor_name == name else w

        monkeypatch.setattr(gguf, "tensor", tensor)
        return gguf

    monkeypatch.setattr(load, "read_gguf", read_with_planted_tensor)
    with pytest.raises(UserError) as error:
        load_checkpoint(None)
    message = str(error.value)
    assert "\n" not in message
    assert name in message and "(574, 576)" in message and "(576, 576)" in message
