"""CLUE-style JSON-lines files -> `Examples` (texts, label indices, ids), every problem a one-line error.

One JSON object per line: `sentence1` (and `sentence2` for pairs), `label` (a string of
`data.label_names`; absent in test files) and `id`; the field names are configurable. Any problem
raises `InputError` naming the file and line: malformed JSON, non-UTF-8 text, a missing field,
a label outside the label set, rows that disagree on which fields they have.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sda_jax.errors import InputError

_UTF8_BOM = "\ufeff"
_JSON_DECODER = json.JSONDecoder()


@dataclass(frozen=True, eq=False)
class Examples:
    """The rows of one data file, in file order."""

    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence data sets
    labels: np.ndarray | None  # int32 class indices; None when the file has no labels
    ids: list  # the file's id field, else the 0-based example index
    path: str
    empty_text_lines: tuple[int, ...] = ()  # lines with an empty sentence: kept, but worth a note

    def __len__(self) -> int:
        return len(self.text_a)


def read_clue_file(
    path: str | Path,
    label_names: Sequence[str],
    *,
    require_labels: bool,
    text_a_key: str = "sentence1",
    text_b_key: str = "sentence2",
    label_key: str | None = "label",
    id_key: str = "id",
) -> Examples:
    """Read a CLUE-style JSON-lines file; any problem raises `InputError` naming file and line.
    With `label_key` None no label is read (masked-LM pretraining's text: whatever the rows hold there)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[err.start]:02x}); the file must be "
            "UTF-8 encoded (GBK or other encodings are not accepted)"
        ) from None
    text = text.removeprefix(_UTF8_BOM)

    label_index = {str(name): i for i, name in enumerate(label_names)}
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int] = []
    ids: list = []
    linenos: list[int] = []
    # Line of the first example, and whether it had text_b / a label: every later row must agree.
    first_lineno = 0
    has_b = has_label = False
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and similar breaks.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        where = f"{path}:{lineno}"
        try:
            row = _parse_json_line(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")

        a = row.get(text_a_key)
        if a is None:
            raise InputError(f"{where}: missing {text_a_key!r}")
        b = row.get(text_b_key)
        label = row.get(label_key)
        if not first_lineno:
            first_lineno, has_b, has_label = lineno, b is not None, label is not None
        if (b is not None) != has_b:
            raise InputError(
                f"{where}: {'has' if b is not None else 'missing'} {text_b_key!r}, but line "
                f"{first_lineno} {'has' if has_b else 'has no'} {text_b_key!r} (all rows must agree)"
            )
        if not isinstance(a, str) or (b is not None and not isinstance(b, str)):
            key = text_a_key if not isinstance(a, str) else text_b_key
            raise InputError(f"{where}: {key!r} must be a string")
        if label is None and require_labels:
            raise InputError(f"{where}: missing {label_key!r}")
        if (label is not None) != has_label:
            raise InputError(
                f"{where}: {'has' if label is not None else 'missing'} {label_key!r}, but line "
                f"{first_lineno} {'has' if has_label else 'has no'} {label_key!r} (all rows must agree)"
            )
        if label is not None:
            index = label_index.get(str(label))
            if index is None:
                raise InputError(f"{where}: {label_key} {label!r} is not one of the allowed labels {list(label_index)}")
            labels.append(index)
        ids.append(row.get(id_key, len(text_a)))
        linenos.append(lineno)
        text_a.append(a)
        if b is not None:
            text_b.append(b)

    if not text_a:
        raise InputError(f"{path}: no examples (the file is empty or blank)")
    try:
        # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer accepts; one
        # encode of everything finds out cheaply whether any row needs looking at.
        "".join(itertools.chain(text_a, text_b)).encode("utf-8")
    except UnicodeEncodeError:
        rows = zip(text_a, text_b, strict=True) if has_b else zip(text_a)
        bad = next(i for i, texts in enumerate(rows) if not _encodable("".join(texts)))
        raise InputError(f"{path}:{linenos[bad]}: text contains a lone UTF-16 surrogate (invalid Unicode)") from None
    empty = [lineno for lineno, a, b in zip(linenos, text_a, text_b or itertools.repeat("x")) if not a or not b]
    return Examples(
        text_a=text_a,
        text_b=text_b if has_b else None,
        labels=np.asarray(labels, dtype=np.int32) if has_label else None,
        ids=ids,
        path=str(path),
        empty_text_lines=tuple(empty),
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json_line(line: str) -> object:
    """`json.loads`, minus its wrapper overhead in the common case (~30% of reading AFQMC)."""
    try:
        value, end = _JSON_DECODER.raw_decode(line)
    except json.JSONDecodeError:
        # Leading whitespace, or a real error that json.loads reports the same way.
        return json.loads(line)
    if end != len(line) and not line[end:].isspace():
        raise json.JSONDecodeError("Extra data", line, end)
    return value
