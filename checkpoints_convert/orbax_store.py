"""Save and restore parameter pytrees with Orbax (orbax-checkpoint `StandardCheckpointer`).

`restore_tree` takes an abstract tree of `jax.ShapeDtypeStruct`s; each array is read straight onto
its leaf's `sharding` (Orbax docs, "Checkpointing PyTrees of arrays"), so a sharded model never
materialises whole on one device. Leaves without a sharding land on the default device.

`None` leaves (e.g. the lm_head of a tied model) are saved as empty subtrees and come back as `None`.
A `None` in the abstract tree skips whatever the checkpoint holds there; an array requested where the
checkpoint holds `None` is an error (Orbax alone would quietly return `None`).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from engine.errors import UserError


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
            restored = checkpointer.restore(path, target)
    except (ValueError, FileNotFoundError) as e:  # how Orbax reports missing, corrupt or mismatched data
        raise UserError(f"cannot restore the checkpoint in {path}: {' '.join(str(e).split())[:400]}") from e
    # Orbax fills a requested array with None when the checkpoint stored None there; refuse instead.
    missing = sorted(_leaf_paths(target) - _leaf_paths(restored))
    if missing:
        raise UserError(
            f"the checkpoint in {path} has None where arrays were requested: {', '.join(missing)}"
        )
    return restored


def _leaf_paths(tree: Any) -> set[str]:
    return {jax.tree_util.keystr(key_path) for key_path, _ in jax.tree_util.tree_leaves_with_path(tree)}
