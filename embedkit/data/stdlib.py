"""The embedded demo data: docstrings of this Python's standard library as clustering sets (label = the
top-level module), parsed with ``ast`` (nothing imported or executed); ``split="train"`` gives the
docstrings disjoint from the evaluated sample, from which ``embedkit.data.stdlib_pairs`` builds pairs."""

from __future__ import annotations

import ast
import functools
import random
import re
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from embedkit.data.clustering import ClusteringSet
from embedkit.errors import EmbedkitError

__all__ = ["first_sentence", "stdlib_docstrings"]

_SKIP_TOP = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "site-packages",
             "this", "antigravity", "__phello__",
             "encodings"}  # encodings: generated codec modules with near-identical docstrings


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (the whole paragraph if it has no end mark)."""
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
    builders = {"s2s": first_sentence, "p2p": lambda d: " ".join(d.split())[:max_chars]}
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
