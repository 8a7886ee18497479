"""Writing files safely: a temporary file in the destination folder, renamed into place."""

from __future__ import annotations

import os
import tempfile

from graphopt.errors import GraphoptError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); temporary files start at 0o600."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plainly created folder gets (0o777 less the umask); temporary folders start at 0o700."""
    return 0o777 & ~_umask()


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphoptError(f"{path}: the folder {folder} does not exist")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".graphopt-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
