"""Save and restore parameter pytrees with Orbax (orbax-checkpoint `StandardCheckpointer`).

`restore_tree` takes an abstract tree of `jax.ShapeDtypeStruct`s; each array is read straight onto
its leaf's `sharding` (Orbax docs, "Checkpointing PyTrees of arrays"), so a sharded model never
materialises whole on one device. Leaves without a sharding land on the default device.

`None` leaves (e.g. the lm_head of a tied model) are saved as empty subtrees and come back as `None`.
A `None` in the abstract tree skips whatever the checkpoint holds there; an array requested where the
checkpoint holds `None` (or nothing) is an error.

Validate before trusting: `save_tree` also writes `file_sizes.json`, the size of every file Orbax
wrote, and `restore_tree` checks it before reading, so a file cut short or missing is named in one
`UserError` instead of surfacing as Orbax's asynchronous tracebacks midway through the read. Any other
failure of Orbax to read the metadata or the data (corrupt bytes, a checkpoint written without the
sizes file) becomes one `UserError` with Orbax's underlying reason.
"""

import contextlib
import json
import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from pallas_kernels.errors import UserError

FILE_SIZES = "file_sizes.json"
_READ_FAILED = False  # see _orbax_quiet


def save_tree(directory: str | os.PathLike, pytree: Any) -> None:
    """Write `pytree` (arrays and `None`s) to a new checkpoint directory; blocks until it is on disk."""
    path = os.path.abspath(directory)  # Orbax requires absolute paths
    if os.path.exists(path):
        raise UserError(f"checkpoint directory already exists: {path}; delete it or choose another")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, pytree)
    sizes = {os.path.relpath(os.path.join(folder, name), path): os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(path) for name in names}
    with open(os.path.join(path, FILE_SIZES), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)


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
    _check_file_sizes(path)
    with _orbax_quiet(), ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path).item_metadata
        except Exception as e:  # Orbax raises many types for unreadable metadata
            raise UserError(f"{path}: unreadable Orbax metadata: {_reason(e)}") from None
        if stored is None:
            raise UserError(f"{path}: no readable Orbax metadata (damaged, or not an Orbax checkpoint)")
        _check_shapes(path, stored.tree, target)
        try:
            return checkpointer.restore(path, target)
        except Exception as e:  # and more (ValueError, tensorstore's plain Exception) for bad data
            raise UserError(f"{path}: cannot restore the checkpoint: {_reason(e)}") from None


def _check_file_sizes(path: str) -> None:
    """Every file `save_tree` wrote is still there with its size (skipped for checkpoints written
    by Orbax alone, which have no sizes file)."""
    sizes_path = os.path.join(path, FILE_SIZES)
    if not os.path.exists(sizes_path):
        return
    try:
        with open(sizes_path, encoding="utf-8") as f:
            sizes = json.load(f)
        sizes = {str(name): int(size) for name, size in sizes.items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{sizes_path}: damaged ({_reason(e)}); convert the checkpoint again") from None
    for name, size in sorted(sizes.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{file}: missing from the checkpoint; convert it again")
        if os.path.getsize(file) != size:
            raise UserError(f"{file}: {os.path.getsize(file)} bytes, but {size} were written "
                            "(cut short or damaged); convert the checkpoint again")


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause: Orbax wraps the real reason (tensorstore's
    `OUT_OF_RANGE ... byte range`, a JSON error) in several layers."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def _orbax_quiet():
    """Silences Orbax's own reports while it reads: its failures come back as one UserError.

    After a failed read, Orbax's abandoned coroutines and tensorstore's callbacks to its closed
    event loop each print a traceback as an "unraisable" exception, some of them after this block
    has ended: from the first failure on, unraisable reports are dropped (as are the closed-loop
    ones, which also follow an empty metadata read).
    """
    if not getattr(sys.unraisablehook, "orbax_quiet", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            error = unraisable.exc_value
            closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            if not (closed_loop or _READ_FAILED):
                previous(unraisable)

        hook.orbax_quiet = True
        sys.unraisablehook = hook
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    except UserError:
        global _READ_FAILED
        _READ_FAILED = True
        raise
    finally:
        logger.setLevel(level)


def _check_shapes(path: str, stored_tree: Any, target: Any) -> None:
    """Fail before reading any data if a requested array is absent or shaped differently on disk,
    or the checkpoint holds arrays that were not requested (nor skipped with a `None`).

    Orbax alone would quietly return None for an array stored as None, and would report a shape
    or structure mismatch only midway through reading the other arrays.
    """
    stored = {_name(key_path): leaf for key_path, leaf in jax.tree_util.tree_leaves_with_path(stored_tree)}
    requested, skipped = set(), []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda x: x is None)[0]:
        name = _name(key_path)
        if leaf is None:
            skipped.append(name)
            continue
        requested.add(name)
        if name not in stored:
            raise UserError(f"{path}: the checkpoint has no array {name!r}, which the model "
                            "config asks for")
        if tuple(stored[name].shape) != leaf.shape:
            raise UserError(
                f"{path}: the checkpoint has {name!r} with shape {tuple(stored[name].shape)}, "
                f"but {leaf.shape} was requested by the model config"
            )
    extra = sorted(name for name in stored if name not in requested
                   and not any(name == s or name.startswith(s + ".") for s in skipped))
    if extra:
        raise UserError(f"{path}: the checkpoint has {len(extra)} array(s) the model config does "
                        f"not ask for, e.g. {extra[0]!r}")


def _name(key_path: Any) -> str:
    """'layers.0.w' whether the tree holds dataclasses, dicts or lists (Orbax stores them as dicts)."""
    return jax.tree_util.keystr(key_path, simple=True, separator=".")
