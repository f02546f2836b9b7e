"""Read a checkpoint's JSON file (a config, a tokenizer, an index) or say in one `UserError`
which file is missing, unreadable, not UTF-8 (JSON's encoding, RFC 8259) or not a JSON object."""

import json
import os
from typing import Any

from pallas_kernels.errors import UserError


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is damaged or cut short") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
