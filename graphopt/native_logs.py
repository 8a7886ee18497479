"""Native libraries' log lines (TVM's C++ `LOG(WARNING)`) kept off the user's terminal.

    with native_stderr_to_log("TVM build"):
        executable = relax.build(...)

C++ code writes to file descriptor 2 directly, past `sys.stderr`. For the block, fd 2 goes to
a temporary file; afterwards the lines are logged on the `graphopt` logger at INFO (shown by
`graphopt -v`), prefixed by `what`. Python writes to stderr inside the block are captured too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

_LOGGER = logging.getLogger("graphopt")


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Redirect fd 2 into a temporary file for the block; log what was written (see the module doc)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (e.g. a service without stderr): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    _LOGGER.info("%s: %s", what, line.rstrip())
