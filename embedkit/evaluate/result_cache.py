"""Per-task result cache: a finished (configuration, task) pair is read back instead of re-evaluated.

A layer above the embedding cache (``encoder.py``). The key holds everything a score depends on: the
model's weights fingerprint (which includes a loaded or freshly trained adapter's identity and the
dtype), the prompt template, the pooling, the text length cut, the task's name and content digest
(or an MTEB task's dataset revision), the evaluator settings and the mteb version. Nothing of the run
folder goes in, so a re-run sweep in a new timestamped folder finds the scores of the old one.
Entries are small JSON files written atomically under ``${paths.output_root}/cache/results``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from embedkit.io import write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_key(fields: dict) -> str:
    """SHA-256 of the canonical JSON of ``fields`` (everything one task's score depends on)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, fields], sort_keys=True, default=str).encode()).hexdigest()


class ResultCache:
    """``get(fields)`` -> score or None; ``put(fields, score)``. ``overwrite=True`` never reads (every
    score is recomputed) but still writes, so the cache holds the newest scores afterwards."""

    def __init__(self, root: str | Path, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = overwrite

    def path(self, fields: dict) -> Path:
        """The file that holds the score of ``fields``."""
        key = cache_key(fields)
        return self.root / key[:2] / f"{key}.json"

    def get(self, fields: dict) -> float | None:
        """The cached score of ``fields``, or None (also when ``overwrite`` is on or the file is unreadable)."""
        if self.overwrite:
            return None
        path = self.path(fields)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return float(entry["score"])
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged entry is recomputed and rewritten
            log.warning("ignoring unreadable result-cache entry %s (%s)", path, e)
            return None

    def put(self, fields: dict, score: float) -> None:
        """Store ``score`` for ``fields`` (atomically; the entry also holds the fields, for inspection)."""
        write_json(self.path(fields), {"score": score, "key": fields,
                                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
