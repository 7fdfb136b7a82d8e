"""JSON Lines reading with errors that name the file and line: one object per line, blank lines skipped, optionally a
torn last line (an append-only log cut by a kill) dropped. Standard library only (no torch, no third-party package).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class JsonlError(ValueError):
    """A JSONL file that cannot be read; the message starts with `file:line:` (or `file:` for the whole file)."""


def parse_line(raw: bytes | str, path: str | os.PathLike, lineno: int,
               error: type[ValueError] = JsonlError) -> dict[str, Any] | None:
    """The JSON object on one line, or None for a blank line. Raises `error` (a ValueError subclass taking one
    message) naming `path:lineno` for bytes that are not UTF-8, text that is not JSON, or JSON that is not an object.
    For callers that loop over the raw lines themselves (e.g. to hash them or show a byte progress bar)."""
    where = f"{path}:{lineno}"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object (one per line), got {type(obj).__name__}")
    return obj


def iter_jsonl(path: str | os.PathLike, torn_tail: bool = False,
               error: type[ValueError] = JsonlError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of `path`.

    `torn_tail`: a last line that does not end in a newline is a write cut short (the writer appends whole lines
    ending in "\\n"), so it is skipped rather than parsed; without it such a line is parsed like any other.
    `error` is the exception class raised (default JsonlError), so a caller keeps its own error type
    (e.g. DatasetError, TableError); a missing file raises it too.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if torn_tail and not raw.endswith(b"\n"):
                log.info("%s:%d: dropping a torn last line (%d bytes without a newline)", path, lineno, len(raw))
                break
            obj = parse_line(raw, path, lineno, error)
            if obj is not None:
                yield lineno, obj
