"""The one exception type for problems in the user's files or config, and how commands report errors.

Entry points catch `InputError` and call `exit_with_error`: one line on stderr, `error: ...`, and
exit status 2, so a bad input never ends in a traceback wall. The message must name the file
(and line) or the config key that is wrong.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class InputError(Exception):
    """Bad user input: a file, a line in it, or a config key. `str(err)` is the whole message."""


def print_error(message: object) -> None:
    """`error: <message>` on stderr, folded onto one line."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def exit_with_error(message: object, status: int = 2) -> NoReturn:
    print_error(message)
    sys.exit(status)
