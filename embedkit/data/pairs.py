"""Positive pairs for contrastive fine-tuning: a JSONL file, unlabelled texts, or the embedded stdlib train split.

A pair file has one JSON object per line with ``anchor`` and ``positive`` (and optionally ``negative``,
a hard negative). ``anchor == positive`` is the unsupervised SimCSE form: the two views then differ only
by dropout (set ``train.model_dropout``). ``load_texts`` (``pairs=texts``) reads texts only (JSONL or one
text per line) into that form; an ``augmentation`` option (``crop``, ``first_rest``, ...) then makes the
positives. Problems stop the run before any model work, naming the line.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from embedkit.data.stdlib import first_sentence, stdlib_docstrings
from embedkit.errors import EmbedkitError
from embedkit.io import iter_jsonl, iter_lines, preview

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """Training pairs: ``anchors[i]`` and ``positives[i]`` (and ``negatives[i]`` where the file has a
    hard negative) are one pair; ``name`` and ``source`` say where they came from."""
    name: str
    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.anchors:
            raise EmbedkitError(f"pair set {self.source or self.name} is empty; give a file with "
                                'lines like {"anchor": "...", "positive": "..."}')
        if len(self.anchors) != len(self.positives):
            raise EmbedkitError(f"{self.name}: {len(self.anchors)} anchors but {len(self.positives)} positives")
        if self.negatives is not None and len(self.negatives) != len(self.anchors):
            raise EmbedkitError(f"{self.name}: hard negatives must be given for every pair or for none")

    def __len__(self) -> int:
        return len(self.anchors)

    def describe(self) -> dict:
        """What results.json records about the pairs: name, source, count, whether hard negatives exist,
        how many anchors equal their positive and how many pairs are repeated."""
        return {"name": self.name, "source": self.source, "n_pairs": len(self),
                "hard_negatives": self.negatives is not None,
                "anchor_is_positive": sum(a == p for a, p in zip(self.anchors, self.positives)),
                "duplicate_pairs": len(self.anchors) - len(set(zip(self.anchors, self.positives)))}


def load_pairs(path: str, anchor_field: str = "anchor", positive_field: str = "positive",
               negative_field: str = "negative", max_rows: int | None = None, seed: int = 0) -> PairSet:
    """Read a pair file; ``max_rows`` keeps a seeded random subset (file order kept)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EmbedkitError(f"pairs.path={path!r} is not a file; give a JSONL file of "
                            '{"anchor": ..., "positive": ...} lines')
    anchors, positives, negatives, seen, dupes = [], [], [], set(), []
    for lineno, row in iter_jsonl(file, example='{"anchor": "...", "positive": "..."}'):
        for key in (anchor_field, positive_field):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise EmbedkitError(f"{file}:{lineno}: '{key}' is missing or empty (keys: {', '.join(row)}); set "
                                    "pairs.anchor_field / pairs.positive_field if your file names them differently")
        anchors.append(row[anchor_field])
        positives.append(row[positive_field])
        negative = row.get(negative_field)
        if negative is not None and (not isinstance(negative, str) or not negative.strip()):
            raise EmbedkitError(f"{file}:{lineno}: '{negative_field}' must be a non-empty string (or absent), got "
                                f"{negative!r:.80}")
        negatives.append(negative)
        if (anchors[-1], positives[-1]) in seen:
            dupes.append(lineno)
        seen.add((anchors[-1], positives[-1]))
    if dupes:
        log.warning("%s: %d duplicate pairs (lines %s); kept as given (a duplicate in the same batch is "
                    "masked as a false negative)", file, len(dupes), preview(dupes))
    given = [n is not None for n in negatives]
    if any(given) and not all(given):
        first = given.index(not given[0]) + 1
        raise EmbedkitError(f"{file}: '{negative_field}' is given on some rows but not others (e.g. pair {first});"
                            " give a hard negative for every pair or for none")
    pairs = PairSet(file.stem if file.stem != "train" else file.parent.name, anchors, positives,
                    negatives if all(given) and given else None, str(file))
    return subsample(pairs, max_rows, seed)


def load_texts(path: str, text_field: str = "text", format: str = "auto", max_rows: int | None = None,
               seed: int = 0) -> PairSet:
    """Unlabelled texts as SimCSE-form pairs (anchor == positive == the text), for ``pairs=texts``.

    ``format``: ``jsonl`` (one object per line; only ``text_field`` is read, labels and other keys never
    are), ``txt`` (one text per line) or ``auto`` (by the suffix: ``.jsonl``/``.ndjson`` or ``.txt``/``.text``).
    Blank texts are skipped and duplicates kept once (both counted in a warning); a missing or non-string
    text field stops with the line named. ``max_rows`` keeps a seeded random subset (file order kept).
    The positives are meant to be replaced by an ``augmentation`` option's views; with ``augmentation=none``
    the two views differ only by dropout (``train.model_dropout > 0``).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise EmbedkitError(f"pairs.path={path!r} is not a file; give a JSONL file with a '{text_field}' field per "
                            "line or a .txt file with one text per line")
    kind = format if format != "auto" else {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt",
                                            ".text": "txt"}.get(file.suffix.lower())
    if kind not in ("jsonl", "txt"):
        raise EmbedkitError(f"pairs.format={format!r} for {file.name}: use jsonl, txt, or auto with a .jsonl, "
                            ".ndjson, .txt or .text file")
    texts, seen, blank, dupes = [], set(), [], 0
    if kind == "jsonl":
        rows = ((n, row.get(text_field)) for n, row in iter_jsonl(file, example=f'{{"{text_field}": "..."}}'))
    else:
        rows = ((n, line.rstrip("\r\n")) for n, line, _ in iter_lines(file))
    for lineno, text in rows:
        if not isinstance(text, str):
            raise EmbedkitError(f"{file}:{lineno}: '{text_field}' is {'missing' if text is None else type(text).__name__}"
                                ", expected a string; set pairs.text_field if your file names the text differently")
        if not text.strip():
            blank.append(lineno)
        elif text in seen:
            dupes += 1
        else:
            seen.add(text)
            texts.append(text)
    if blank or dupes:
        log.warning("%s: skipped %d blank text(s)%s and %d duplicate(s); %d texts kept", file, len(blank),
                    f" (lines {preview(blank)})" if blank else "", dupes, len(texts))
    if not texts:
        raise EmbedkitError(f"pair set {file} is empty: no non-blank text ({len(blank)} blank lines)")
    name = file.stem if file.stem != "train" else file.parent.name
    return subsample(PairSet(name, texts, list(texts), None, str(file)), max_rows, seed)


def subsample(pairs: PairSet, max_rows: int | None, seed: int) -> PairSet:
    """A seeded random subset of ``max_rows`` pairs of ``pairs``, in their original order (all when None)."""
    if max_rows is None or max_rows >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), max_rows))
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return PairSet(pairs.name, pick(pairs.anchors), pick(pairs.positives), pick(pairs.negatives), pairs.source)


def stdlib_pairs(min_words: int = 5, max_chars: int = 1500, max_rows: int | None = None, seed: int = 0,
                 **split_kwargs) -> PairSet:
    """Title -> body pairs from the stdlib docstrings of the *train* split (disjoint from the demo's
    evaluation split): anchor = first sentence, positive = the rest of the docstring."""
    (train,) = stdlib_docstrings(tasks=("p2p",), split="train", max_chars=max_chars, seed=seed, **split_kwargs)
    (test,) = stdlib_docstrings(tasks=("p2p",), split="test", max_chars=max_chars, seed=seed, **split_kwargs)
    held_out = set(test.texts)
    anchors, positives = [], []
    for doc in train.texts:
        head = first_sentence(doc)
        rest = doc[len(head):].strip() if doc.startswith(head) else ""
        if doc not in held_out and len(head.split()) >= 3 and len(rest.split()) >= min_words:
            anchors.append(head)
            positives.append(rest)
    return subsample(PairSet("stdlib-title-body", anchors, positives, None, train.source), max_rows, seed)
