"""Clustering data: labelled texts from a folder of JSONL files, or the embedded stdlib demo set.

Every loader returns a list of ``ClusteringSet``; the evaluator turns each into an MTEB task.
Problems in the data stop the run before any model work, with the file and line in the message.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import random
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import iter_jsonl

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
        return len(set(self.labels))

    def describe(self) -> dict:
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
        log.warning("%s: skipped %d empty texts (lines %s)", path, len(skipped), _first(skipped))
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
                    path, len(dupes), _first(dupes))
    if conflicts:
        log.warning("%s: %d rows repeat an earlier text under another label (lines %s)", path, len(conflicts),
                    _first(conflicts))
    if singletons:
        log.warning("%s: %d label(s) occur on one row only (%s); a cluster of one says little", path,
                    len(singletons), _first(singletons))
    if long_lines:
        log.warning("%s: %d text(s) longer than %d characters (lines %s); each is cut to encode.max_length "
                    "tokens when encoded", path, len(long_lines), LONG_TEXT_CHARS, _first(long_lines))
    return {"duplicate_rows": len(dupes), "conflicting_labels": len(conflicts),
            "singleton_labels": len(singletons), "long_texts": len(long_lines)}


def _first(items: list, n: int = 10) -> str:
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


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


# --- named MTEB tasks (from the hub) ---------------------------------------------------------------

@dataclass
class MtebTask:
    """A task of mteb's registry (e.g. TwentyNewsgroupsClustering), evaluated with its own evaluator."""

    task: object

    @property
    def name(self) -> str:
        return self.task.metadata.name

    def describe(self) -> dict:
        meta = self.task.metadata
        return {"source": f"mteb:{meta.dataset['path']}@{meta.dataset.get('revision')}", "type": meta.type,
                "main_score": meta.main_score, "eval_splits": list(meta.eval_splits)}


def mteb_tasks(tasks: list[str] | None = None, benchmark: str | None = None,
               task_type: str | None = "Clustering") -> list[MtebTask]:
    """Named MTEB tasks, or the tasks of a benchmark filtered by type; data are loaded here (from the
    datasets cache, or the hub with EMBEDKIT_ONLINE=1), so a missing dataset stops the run before any
    model work."""
    from embedkit.evaluate.clustering import _mteb

    mteb = _mteb()
    try:
        if benchmark:
            found = [t for t in mteb.get_benchmark(benchmark).tasks if task_type is None or t.metadata.type == task_type]
        else:
            if not tasks:
                raise EmbedkitError("data.tasks is empty; name MTEB tasks, e.g. data.tasks=[TwentyNewsgroupsClustering]")
            found = list(mteb.get_tasks(tasks=list(tasks)))
    except KeyError as e:
        raise EmbedkitError(f"unknown MTEB task or benchmark: {e.args[0]}") from None
    for task in found:
        try:
            task.load_data()
        except (ConnectionError, OSError) as e:
            raise EmbedkitError(
                f"MTEB task {task.metadata.name} is not cached and the hub is unreachable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Run once with internet and EMBEDKIT_ONLINE=1 to download it, "
                "or evaluate local data with data=jsonl data.root=...") from None
    return [MtebTask(t) for t in found]


# --- the embedded demo set -------------------------------------------------------------------------

_SKIP_TOP = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "site-packages",
             "this", "antigravity", "__phello__",
             "encodings"}  # encodings: generated codec modules with near-identical docstrings


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return m.group(1) if m else para


def stdlib_docstrings(min_per_label: int = 40, max_per_label: int = 25, max_chars: int = 1500, seed: int = 0,
                      tasks: tuple[str, ...] = ("s2s", "p2p"), split: str = "test") -> list[ClusteringSet]:
    """Docstrings of this Python's standard library as clustering tasks (label = top-level module).

    Source files are parsed with ``ast``; nothing is imported or executed. ``s2s`` uses the first
    sentence of each docstring, ``p2p`` the whole docstring (cut at ``max_chars``). Private names and
    one-line docstrings shorter than four words are skipped. Deterministic for a Python version.
    ``split="test"`` (evaluation) is the sample; ``split="train"`` is every other docstring of the same
    modules, disjoint from it (fine-tuning pairs come from there, see ``embedkit.data.stdlib_pairs``).
    """
    unknown = set(tasks) - {"s2s", "p2p"}
    if unknown:
        raise EmbedkitError(f"data.tasks: unknown {sorted(unknown)}; choose from s2s, p2p")
    if split not in ("test", "train"):
        raise EmbedkitError(f"data.split must be 'test' or 'train', got {split!r}")
    chosen = _stdlib_sample(min_per_label, max_per_label, seed)[split]
    builders = {"s2s": _first_sentence, "p2p": lambda d: " ".join(d.split())[:max_chars]}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    suffix = "" if split == "test" else "-train"
    return [ClusteringSet(f"stdlib-{t}{suffix}", [builders[t](d) for _, d in chosen],
                          [lab for lab, _ in chosen], f"{version} standard library docstrings ({split} split)")
            for t in tasks]


@functools.lru_cache(maxsize=4)
def _stdlib_sample(min_per_label: int, max_per_label: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """(label, docstring) pairs per split; parsing the stdlib takes seconds, so a sweep does it once."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[str]] = defaultdict(list)
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        top = rel.parts[0].removesuffix(".py")
        if top.startswith("_") or top in _SKIP_TOP or any(p in ("test", "tests") for p in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                          and not n.name.startswith("_")]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 4:
                docs[top].append(doc)
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"test": [], "train": []}
    for top in sorted(docs):
        unique = list(dict.fromkeys(docs[top]))
        if len(unique) >= min_per_label:
            test = set(rng.sample(unique, min(max_per_label, len(unique))))
            splits["test"] += [(top, d) for d in sorted(test)]
            splits["train"] += [(top, d) for d in unique if d not in test]
    return splits
