"""Maps `--compress` names to compression methods."""

from engine.errors import UserError

METHODS: dict[str, object] = {"none": None}


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown compression method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
