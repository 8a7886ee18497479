"""Writing files safely: a temporary file in the destination folder, renamed into place."""

from __future__ import annotations

import os
import tempfile

from graphopt.errors import GraphoptError


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphoptError(f"{path}: the folder {folder} does not exist")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".graphopt-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
