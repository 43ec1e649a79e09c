"""Files and folders that readers see whole or not at all: written beside their target, then renamed.

A kill or a full disk in the middle of a write leaves the previous file (or no folder), never a
prefix: predictions, summaries, settings, plots and exports all go through here. A write that
fails for lack of space removes its temporary file and raises `NoSpaceError` naming the folder.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from sda_jax.errors import no_space


def write_text(path: pathlib.Path, text: str) -> None:
    """Readers of `path` see the old file or the whole new one."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: pathlib.Path, data: bytes) -> None:
    path = pathlib.Path(path)
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, prefix=f".{path.name}.", suffix=".tmp") as tmp:
            tmp_name = tmp.name
            tmp.write(data)
        _chmod_as_created(pathlib.Path(tmp.name), 0o666)
        os.replace(tmp.name, path)
    except OSError as err:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise no_space(err, path.parent, path.name) or err from None


@contextlib.contextmanager
def new_folder(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `out`; renames it to `out` when the block succeeds.

    `out` must not exist or be an empty folder, when entering and again when renaming. On any
    error the temporary folder is removed and `out` is left as it was. OSError propagates.
    """
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        # mkdtemp makes a 0700 folder and some writers 0600 files: give them the usual modes.
        _chmod_as_created(tmp, 0o777)
        for path in tmp.iterdir():
            _chmod_as_created(path, 0o666)
        os.replace(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
    except Exception as err:  # OSError, or a library's error of a failed write (safetensors')
        raise no_space(err, out.parent, out.name) or err from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _chmod_as_created(path: pathlib.Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
