"""Save and restore parameter pytrees with Orbax (orbax-checkpoint `StandardCheckpointer`).

`restore_tree` takes an abstract tree of `jax.ShapeDtypeStruct`s; each array is read straight onto
its leaf's `sharding` (Orbax docs, "Checkpointing PyTrees of arrays"), so a sharded model never
materialises whole on one device. Leaves without a sharding land on the default device.

`None` leaves (e.g. the lm_head of a tied model) are saved as empty subtrees and come back as `None`.
A `None` in the abstract tree skips whatever the checkpoint holds there; an array requested where the
checkpoint holds `None` (or nothing) is an error.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from pallas_kernels.errors import UserError


def save_tree(directory: str | os.PathLike, pytree: Any) -> None:
    """Write `pytree` (arrays and `None`s) to a new checkpoint directory; blocks until it is on disk."""
    path = os.path.abspath(directory)  # Orbax requires absolute paths
    if os.path.exists(path):
        raise UserError(f"checkpoint directory already exists: {path}; delete it or choose another")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, pytree)


def restore_tree(directory: str | os.PathLike, abstract_tree: Any) -> Any:
    """Read the checkpoint at `directory` into arrays with `abstract_tree`'s shapes, dtypes and shardings."""
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise UserError(f"checkpoint directory not found: {path}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default),
        abstract_tree,
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path).item_metadata
            if stored is None:
                raise UserError(f"{path} is not an Orbax checkpoint (it has no readable metadata)")
            _check_shapes(path, stored.tree, target)
            return checkpointer.restore(path, target)
    except (ValueError, FileNotFoundError) as e:  # how Orbax reports missing, corrupt or mismatched data
        raise UserError(f"cannot restore the checkpoint in {path}: {' '.join(str(e).split())[:400]}") from e


def _check_shapes(path: str, stored_tree: Any, target: Any) -> None:
    """Fail before reading any data if a requested array is absent or shaped differently on disk.

    Orbax alone would quietly return None for an array stored as None, and would report a shape
    mismatch only midway through reading the other arrays.
    """
    stored = {_name(key_path): leaf for key_path, leaf in jax.tree_util.tree_leaves_with_path(stored_tree)}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(target):
        name = _name(key_path)
        if name not in stored:
            raise UserError(f"the checkpoint in {path} has no array {name!r}")
        if tuple(stored[name].shape) != leaf.shape:
            raise UserError(
                f"the checkpoint in {path} has {name!r} with shape {tuple(stored[name].shape)}, "
                f"but {leaf.shape} was requested"
            )


def _name(key_path: Any) -> str:
    """'layers.0.w' whether the tree holds dataclasses, dicts or lists (Orbax stores them as dicts)."""
    return jax.tree_util.keystr(key_path, simple=True, separator=".")
