"""Clustering sets: ``ClusteringSet`` (labelled texts) and the loader of a folder of JSONL files.

Every loader of the ``data`` group (this one, ``embedkit.data.stdlib``, ``embedkit.data.mteb``) returns
a list of clustering sets; the evaluator turns each into an MTEB task. Problems in the data stop the run
before any model work, with the file and line in the message.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import iter_jsonl, preview

log = logging.getLogger(__name__)


@dataclass
class ClusteringSet:
    """One clustering task: texts with gold labels (k = number of distinct labels)."""

    name: str
    texts: list[str]
    labels: list[str]
    source: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise EmbedkitError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        n_labels = len(set(self.labels))
        if n_labels < 2:
            raise EmbedkitError(
                f"{self.source or self.name}: {len(self.texts)} rows but {n_labels} distinct label(s); "
                "clustering needs at least 2 labels"
            )

    @property
    def n_labels(self) -> int:
        """Number of distinct gold labels (the k of k-means)."""
        return len(set(self.labels))

    def describe(self) -> dict:
        """What results.json records about the set: size, labels, source and data-quality notes."""
        return {"n_texts": len(self.texts), "n_labels": self.n_labels, "source": self.source, **self.notes}

    def subsample(self, max_rows: int | None, seed: int) -> "ClusteringSet":
        """A seeded random subset of ``max_rows`` rows, kept in file order."""
        if max_rows is None or max_rows >= len(self.texts):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.texts)), max_rows))
        return ClusteringSet(self.name, [self.texts[i] for i in keep], [self.labels[i] for i in keep],
                             self.source, {**self.notes, "subsample": f"{max_rows} rows, seed {seed}"})


def read_jsonl(path: Path, text_field: str = "text", label_field: str = "label",
               empty_text: str = "error") -> tuple[list[str], list[str], dict]:
    """Read texts and labels; raise ``EmbedkitError`` naming the line for anything malformed."""
    if empty_text not in ("error", "skip"):
        raise EmbedkitError(f"data.empty_text must be 'error' or 'skip', got {empty_text!r}")
    texts, labels, skipped, linenos = [], [], [], []
    for lineno, row in iter_jsonl(path):
        for key in (text_field, label_field):
            if key not in row or row[key] is None:
                raise EmbedkitError(
                    f"{path}:{lineno}: missing field '{key}' (keys: {', '.join(row) or 'none'}); "
                    f"set data.text_field / data.label_field if your file names them differently")
        text = row[text_field]
        if not isinstance(text, str):
            raise EmbedkitError(f"{path}:{lineno}: '{text_field}' must be a string, got {type(text).__name__}")
        if not text.strip():
            if empty_text == "error":
                raise EmbedkitError(f"{path}:{lineno}: empty '{text_field}'; remove the row or set "
                                    "data.empty_text=skip to drop empty texts")
            skipped.append(lineno)
            continue
        texts.append(text)
        labels.append(label_text(row[label_field], path, lineno, label_field))
        linenos.append(lineno)
    if skipped:
        log.warning("%s: skipped %d empty texts (lines %s)", path, len(skipped), preview(skipped))
    return texts, labels, {"skipped_empty": len(skipped), **data_quality(path, texts, labels, linenos)}


def label_text(label, path, lineno: int, label_field: str = "label") -> str:
    """A label as text: strings as given, integers (and integral floats such as ``3.0``) as ``"3"``.
    Anything else (a list, an object, true/false, ``1.5``, NaN) raises ``EmbedkitError`` naming the
    line: ``str()`` of it would silently invent labels (``["0"]`` and ``["1"]`` as two label strings)."""
    if isinstance(label, str):
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    kind = {bool: "a boolean", float: "a non-integral number", list: "a list", dict: "an object"}.get(
        type(label), type(label).__name__)
    shown = json.dumps(label, ensure_ascii=False)
    raise EmbedkitError(f"{path}:{lineno}: '{label_field}' must be a string or an integer, got {kind} "
                        f"({shown[:60]}{'...' if len(shown) > 60 else ''}); give one label per row, "
                        'e.g. "label": "sports" or "label": 3')


LONG_TEXT_CHARS = 100_000  # texts this long are reported; the encoder cuts every text to encode.max_length tokens


def data_quality(path, texts: list[str], labels: list[str], linenos: list[int]) -> dict:
    """Count (and log, with line numbers) what a clustering set may not be meant to contain: exact
    duplicate rows, one text under two labels, labels with a single row, very long texts. Nothing is
    dropped: the counts go into the task's description in ``results.json``."""
    first_seen: dict[tuple[str, str], int] = {}
    label_of: dict[str, str] = {}
    dupes, conflicts = [], []
    for text, label, lineno in zip(texts, labels, linenos):
        if (text, label) in first_seen:
            dupes.append(lineno)
        elif label_of.setdefault(text, label) != label:
            conflicts.append(lineno)
        first_seen.setdefault((text, label), lineno)
    counts = Counter(labels)
    singletons = sorted(lab for lab, n in counts.items() if n == 1)
    long_lines = [ln for t, ln in zip(texts, linenos) if len(t) > LONG_TEXT_CHARS]
    if dupes:
        log.warning("%s: %d duplicate rows (same text and label as an earlier row; lines %s); kept as given",
                    path, len(dupes), preview(dupes))
    if conflicts:
        log.warning("%s: %d rows repeat an earlier text under another label (lines %s)", path, len(conflicts),
                    preview(conflicts))
    if singletons:
        log.warning("%s: %d label(s) occur on one row only (%s); a cluster of one says little", path,
                    len(singletons), preview(singletons))
    if long_lines:
        log.warning("%s: %d text(s) longer than %d characters (lines %s); each is cut to encode.max_length "
                    "tokens when encoded", path, len(long_lines), LONG_TEXT_CHARS, preview(long_lines))
    return {"duplicate_rows": len(dupes), "conflicting_labels": len(conflicts),
            "singleton_labels": len(singletons), "long_texts": len(long_lines)}


def load_jsonl_folder(root: str, include: list[str] | str = ("**/*.jsonl",), text_field: str = "text",
                      label_field: str = "label", empty_text: str = "error", max_rows: int | None = None,
                      seed: int = 0) -> list[ClusteringSet]:
    """One clustering task per JSONL file under ``root`` matching ``include`` (globs)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise EmbedkitError(f"data.root={root!r} is not a folder; point it at a folder of .jsonl files")
    patterns = [include] if isinstance(include, str) else list(include)
    files = sorted({p for pat in patterns for p in base.glob(pat) if p.is_file()})
    if not files:
        raise EmbedkitError(f"no JSONL files under {base} match {patterns}; each task is one .jsonl file "
                            'with lines like {"text": "...", "label": "..."}')
    sets = []
    for path in files:
        texts, labels, notes = read_jsonl(path, text_field, label_field, empty_text)
        name = path.relative_to(base).with_suffix("").as_posix()
        sets.append(ClusteringSet(name, texts, labels, str(path), notes).subsample(max_rows, seed))
    return sets
