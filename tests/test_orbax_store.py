"""Orbax save/restore of parameter trees, including None leaves and restores onto given shardings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert.orbax_store import restore_tree, save_tree
from pallas_kernels.errors import UserError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: jax.Array
    layers: list[dict[str, jax.Array]]
    lm_head: jax.Array | None


def _params():
    return Params(
        embed=jnp.arange(24, dtype=jnp.float32).reshape(6, 4),
        layers=[{"w": jnp.full((4, 4), i, jnp.bfloat16), "norm": jnp.ones(4)} for i in range(2)],
        lm_head=None,
    )


def _abstract(tree, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_trees_equal(got, expected):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_round_trip_keeps_values_dtypes_and_none_leaf(tmp_path):
    params = _params()
    save_tree(tmp_path / "ckpt", params)
    restored = restore_tree(tmp_path / "ckpt", _abstract(params))
    assert restored.lm_head is None
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    _assert_trees_equal(restored, params)


def test_restore_places_arrays_on_requested_shardings(tmp_path):
    params = _params()
    save_tree(tmp_path / "ckpt", params)
    device = jax.devices()[0]

    single = jax.sharding.SingleDeviceSharding(device)
    restored = restore_tree(tmp_path / "ckpt", _abstract(params, single))
    assert all(leaf.sharding == single for leaf in jax.tree.leaves(restored))
    _assert_trees_equal(restored, params)

    mesh = jax.sharding.Mesh(np.array([device]), ("model",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    restored = restore_tree(tmp_path / "ckpt", _abstract(params, named))
    assert all(leaf.sharding == named for leaf in jax.tree.leaves(restored))
    _assert_trees_equal(restored, params)


def test_none_in_the_abstract_tree_skips_a_stored_array(tmp_path):
    params = dataclasses.replace(_params(), lm_head=jnp.ones((4, 6)))
    save_tree(tmp_path / "ckpt", params)
    restored = restore_tree(tmp_path / "ckpt", dataclasses.replace(_abstract(params), lm_head=None))
    assert restored.lm_head is None
    _assert_trees_equal(restored.embed, params.embed)


def test_restore_casts_to_the_abstract_dtype(tmp_path):
    save_tree(tmp_path / "ckpt", {"w": jnp.linspace(0, 1, 8, dtype=jnp.float32)})
    restored = restore_tree(tmp_path / "ckpt", {"w": jax.ShapeDtypeStruct((8,), jnp.bfloat16)})
    assert restored["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["w"], jnp.linspace(0, 1, 8).astype(jnp.bfloat16))


def test_saving_over_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_tree(tmp_path / "ckpt", _params())


def test_missing_corrupt_or_mismatched_checkpoint_is_reported(tmp_path):
    params = _params()
    with pytest.raises(UserError, match="checkpoint directory not found"):
        restore_tree(tmp_path / "nope", _abstract(params))

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable Orbax metadata"):
        restore_tree(tmp_path / "empty", _abstract(params))

    save_tree(tmp_path / "ckpt", params)
    wrong_shape = dataclasses.replace(_abstract(params), embed=jax.ShapeDtypeStruct((7, 4), jnp.float32))
    with pytest.raises(UserError, match=r"has 'embed' with shape \(6, 4\), but \(7, 4\) was requested"):
        restore_tree(tmp_path / "ckpt", wrong_shape)
    untied = dataclasses.replace(_abstract(params), lm_head=jax.ShapeDtypeStruct((4, 6), jnp.float32))
    with pytest.raises(UserError, match="has no array 'lm_head'"):
        restore_tree(tmp_path / "ckpt", untied)
    extra_layer = dataclasses.replace(_abstract(params), layers=_abstract(params).layers * 2)
    with pytest.raises(UserError, match="has no array 'layers.2.norm'"):
        restore_tree(tmp_path / "ckpt", extra_layer)
    fewer_layers = dataclasses.replace(_abstract(params), layers=_abstract(params).layers[:1])
    with pytest.raises(UserError, match="2 array.s. the model config does not ask for, e.g. 'layers.1.norm'"):
        restore_tree(tmp_path / "ckpt", fewer_layers)

    save_tree(tmp_path / "corrupt", params)
    for f in (tmp_path / "corrupt").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(UserError, match="file_sizes.json: damaged"):
        restore_tree(tmp_path / "corrupt", _abstract(params))
    (tmp_path / "corrupt" / "file_sizes.json").unlink()  # as a checkpoint written by Orbax alone
    with pytest.raises(UserError, match="no readable Orbax metadata"):
        restore_tree(tmp_path / "corrupt", _abstract(params))
