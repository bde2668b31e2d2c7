"""Atomic writes: write to a temporary file (or folder) beside the target, then rename over it.

A crash or Ctrl-C leaves either the old file or the new one, never a half-written one. Files are
fsync'ed before the rename and their folder after it, so a power loss does not undo a finished write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embedkit.errors import EmbedkitError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary file beside ``path`` for writing; it replaces ``path`` only when the block ends
    without an error, so ``path`` is always either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise
    fsync_dir(path.parent)


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    """A full disk (or quota) while writing is the user's to fix: say so in one line (the partial
    temporary file is already gone and the previous version of ``path``, if any, is untouched)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise EmbedkitError(f"no space left on the disk while writing {path} ({e.strerror}); nothing partial "
                            "was kept. Free some space (or point paths.output_root at another disk) and re-run "
                            "the same command: finished results and caches are reused") from None


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename into it); a no-op where the OS does not allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary folder beside ``path``; when the block succeeds it replaces ``path``
    (a folder that is complete or absent), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, path)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, bool]]:
    """Yield ``(line number, text, ends with a line break)`` for every line, decoded as UTF-8 (a byte-order
    mark at the start is dropped); bad bytes raise ``EmbedkitError`` naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EmbedkitError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the "
                                    "file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (files saved by some Windows editors)
            yield lineno, line, raw.endswith(b"\n")


def iter_jsonl(path: str | os.PathLike, example: str = '{"text": "...", "label": "..."}') -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for every non-blank line; bad bytes, bad JSON and non-objects
    raise ``EmbedkitError`` naming the file and line."""
    for lineno, line, complete in iter_lines(path):
        if line.strip():
            yield lineno, parse_jsonl_line(path, lineno, line, complete, example)


def parse_jsonl_line(path, lineno: int, line: str, complete: bool = True,
                     example: str = '{"text": "...", "label": "..."}') -> dict:
    """One JSONL line as an object; anything else raises ``EmbedkitError`` naming the file and line
    (``complete``: the line ended with a line break, else a parse error is called a truncated file)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        cut = "" if complete else (
            "; it is the last line and has no line end: the file looks truncated (an interrupted copy "
            "or download?)")
        raise EmbedkitError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}){cut}; each "
                            f"line must be one object like {example}") from None
    except RecursionError:
        raise EmbedkitError(f"{path}:{lineno}: JSON nested too deeply to read; each line must be one "
                            f"flat object like {example}") from None
    if not isinstance(row, dict):
        raise EmbedkitError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    bad = _lone_surrogate(row)
    if bad is not None:
        raise EmbedkitError(f"{path}:{lineno}: field '{bad}' holds an invalid \\u escape (a lone UTF-16 "
                            "surrogate), which is not text; fix or remove the escape")
    return row


def _lone_surrogate(row: dict) -> str | None:
    """The first key whose string value (or the key itself) cannot be encoded as UTF-8, else None."""
    for key, value in row.items():
        for s in (key, value):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    return key.encode("utf-8", "replace").decode() if isinstance(key, str) else str(key)
    return None


def preview(items: list, n: int = 10) -> str:
    """The first ``n`` items joined by commas, with ", ..." when there are more (for messages)."""
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


def check_writable(folder: Path, min_free_mb: float = 0) -> None:
    """The output folder exists or can be made, a file can be written there, and its disk has at least
    ``min_free_mb`` MiB free (``paths.min_free_mb``; 0 turns the space check off)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise EmbedkitError(f"cannot write to the output folder {folder}: {e.strerror}; "
                            "set paths.output_root (or hydra.run.dir) to a writable folder") from None
    if min_free_mb and min_free_mb > 0:
        free = shutil.disk_usage(folder).free / 2**20
        if free < min_free_mb:
            raise EmbedkitError(
                f"only {free:,.0f} MiB free on the disk of {folder}, less than paths.min_free_mb={min_free_mb:,.0f}; "
                "free some space, point paths.output_root at another disk, or lower paths.min_free_mb "
                "(0 turns this check off)")
