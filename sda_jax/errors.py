"""The exception types for what stops a run with one line, and how commands report them.

Entry points catch these and call `exit_with_error`: one line on stderr, `error: ...`, and a
non-zero exit status, so a bad input or a full disk never ends in a traceback wall.

* `InputError` (exit 2): bad user input; the message names the file (and line) or the config key.
* `NoSpaceError` (exit 4): a file could not be written for lack of space (a full disk, a quota, a
  file-size limit); the message names the folder and what was being written. Whatever was written
  before stays intact: checkpoints are renamed into place only when complete, other files are
  written beside their target and renamed (`atomic_write`), so a rerun after freeing space resumes.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn

# errno of "no room": a full disk, a full quota, a file-size limit (RLIMIT_FSIZE).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_SPACE_EXIT = 4


class InputError(Exception):
    """Bad user input: a file, a line in it, or a config key. `str(err)` is the whole message."""


class NoSpaceError(Exception):
    """A write failed for lack of space; `str(err)` is the whole message."""


def no_space(err: BaseException, where: object, what: str) -> NoSpaceError | None:
    """`err` as a NoSpaceError naming `where` (a folder) and `what` was being written, if it is one
    (an OSError of a "no room" errno, or a library's error that carries one: orbax/TensorStore
    report ENOSPC as `... No space left on device [os_error_code='28']`); else None."""
    text = str(err)
    if (isinstance(err, OSError) and err.errno in _NO_SPACE) or any(
        marker in text for marker in ("No space left on device", "Disk quota exceeded", "File too large")
    ) or any(f"os_error_code='{code}'" in text for code in _NO_SPACE):  # fmt: skip
        return NoSpaceError(f"no space left on {where} while writing {what}")
    return None


def print_error(message: object) -> None:
    """`error: <message>` on stderr, folded onto one line."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def exit_with_error(message: object, status: int = 2) -> NoReturn:
    print_error(message)
    sys.exit(status)
