"""Atomic file writes: write to a temporary file in the target folder, then rename over the target.

A crash or Ctrl-C leaves either the old file or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embedkit.errors import EmbedkitError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def iter_jsonl(path: str | os.PathLike, example: str = '{"text": "...", "label": "..."}') -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for every non-blank line; bad bytes, bad JSON and non-objects
    raise ``EmbedkitError`` naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EmbedkitError(f"{path}:{lineno}: not UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EmbedkitError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one object "
                                    f"like {example}") from None
            if not isinstance(row, dict):
                raise EmbedkitError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
