"""JSON files handed in beside an image (a statistics.json, a node info), read or refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tsrt.errors import InputError


def read_json_object(path: str | Path, what: str, hint: str, not_object: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`, or one line (InputError) saying why it cannot be used.

    `what` names the file ("the node info"), `hint` says what to give instead; a document that is not
    an object is refused as "PATH `not_object`." (default: "holds no JSON object: `hint`").
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise InputError(f"Cannot read {what} {path} ({error.strerror}).") from None
    except ValueError:
        raise InputError(f"{path} is not JSON: {hint}.") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} {not_object or f'holds no JSON object: {hint}'}.")
    return document
