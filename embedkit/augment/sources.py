"""Cheap positive sources for texts without pairs (no model): the ``crop``, ``first_rest`` and ``dropout``
options of the ``augmentation`` group, for a user who has only unlabelled texts of their domain
(``pairs=texts``).

* :class:`CropAugmenter` (``crop``): two different random spans of the same document (Contriever's
  "independent cropping"): each span's length is a random fraction of the text in words, and both are
  exact substrings of the text.
* :class:`FirstRestAugmenter` (``first_rest``): the first sentence -> the rest of the text (what
  ``pairs=stdlib`` does with docstrings); texts of one sentence are skipped and counted.
* :class:`DropoutAugmenter` (``dropout``): SimCSE, the positive is the text itself; the two views differ
  only by the model's dropout while training, so it needs ``train.model_dropout > 0``
  (:func:`check_dropout_views` refuses the config before any model work).

All three go through the pair store (:mod:`embedkit.augment.store`) like the other methods: cached,
resumable, with provenance, and a :class:`FilterReport` whose ``dropped`` counts say which texts gave no
pair and why (``too_short``, ``identical``, ``one_sentence``).
"""

from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

from embedkit.augment.base import Augmenter, ChunkResult, Progress, no_progress, text_rng
from embedkit.augment.filters import FilterReport
from embedkit.errors import EmbedkitError

__all__ = ["CropAugmenter", "DropoutAugmenter", "FirstRestAugmenter", "check_dropout_views", "crop_spans",
           "split_first_sentence"]

_WORD = re.compile(r"\S+")


def crop_spans(text: str, rng: random.Random, min_fraction: float = 0.3, max_fraction: float = 0.6,
               min_words: int = 5, retries: int = 3) -> tuple[str, str, int] | None:
    """Two different random spans of ``text``: ``(first, second, attempts)``, or None when there are none.

    Each span is a run of whole words whose length is ``uniform(min_fraction, max_fraction)`` of the
    text's words (at least ``min_words``, at most all words but one, so that two positions exist) at a
    random start; the spans are exact substrings of ``text`` (its own spacing and line breaks kept) and
    may overlap. A second span equal to the first is re-drawn up to ``retries`` times, then moved one
    word over. None for a text of fewer than ``min_words + 1`` words (no two different spans of
    ``min_words`` words) or one so repetitive that every other span reads the same.
    """
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    n = len(words)
    if n < min_words + 1:
        return None

    def span(start: int, length: int) -> str:
        return text[words[start][0]:words[start + length - 1][1]]

    def draw() -> tuple[int, int]:
        length = min(max(round(rng.uniform(min_fraction, max_fraction) * n), min_words), n - 1)
        return rng.randrange(n - length + 1), length

    first = span(*draw())
    for attempt in range(1, retries + 2):
        start, length = draw()
        second = span(start, length)
        if second != first:
            return first, second, attempt
    for shifted in (start + 1, start - 1):  # the last draw, one word over (length <= n - 1: one side fits)
        if 0 <= shifted <= n - length and span(shifted, length) != first:
            return first, span(shifted, length), retries + 2
    return None


# a sentence ends at . ! ? (closing quotes or brackets may follow) before whitespace, or at a blank line
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s)|\n[ \t]*\n")
# a period after one of these (or after a single letter: "J. Smith") does not end a sentence
_ABBREVIATIONS = frozenset("e.g i.e etc al cf vs fig figs eq eqs ref refs no nos vol pp dr mr mrs ms prof st "
                           "sec ch approx resp jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co".split())


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the period ending at ``text[end - 1]`` belongs to an abbreviation, not a sentence end."""
    if text[end - 1] != ".":
        return False
    word = text[:end - 1].rsplit(None, 1)[-1].lstrip("(\"'“‘[").lower() if text[:end - 1].strip() else ""
    return (len(word) == 1 and word.isalpha()) or word in _ABBREVIATIONS or ("." in word and len(word) <= 5)


def split_first_sentence(text: str, min_words: int = 3) -> tuple[str, str] | None:
    """``(first sentence, rest of the text)``, both stripped, or None when the text has one sentence.

    The first sentence ends at the first ``.``, ``!`` or ``?`` (closing quotes/brackets included) that
    is followed by whitespace, or at a blank line, and that leaves at least ``min_words`` words before
    it (a shorter head, e.g. "Hi." or "Re: Mac.", runs on to the next end); common abbreviations
    ("e.g.", "et al.", "Fig.") and initials ("J. Smith") do not end it. The rest is everything after
    it and must hold a word; the text is exactly ``first + whitespace + rest``.
    """
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if m.group().startswith(".") and _is_abbreviation(text, m.start() + 1):
            continue
        head, rest = text[:end].strip(), text[end:].strip()
        if not re.search(r"\w", rest):
            return None
        if len(head.split()) >= min_words:
            return head, rest
    return None


class _CheapSource(Augmenter):
    """What the three sources share: no model, one pass over each chunk, a :class:`FilterReport` that counts
    the texts that gave no pair by reason. Subclasses implement :meth:`view` (a pair, or a reason)."""

    chunk_size = 5000
    max_source_chars = 20000
    empty_hint = ""

    @property
    def generator(self) -> str:
        """No model: ``'rule-based <method> (no model)'``."""
        return f"rule-based {self.method} (no model)"

    def view(self, text: str, rng: random.Random) -> tuple[str, str, int] | str:
        """``(anchor, positive, attempts)`` for ``text``, or the reason (a short str) it gives no pair."""
        raise NotImplementedError

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int,
                       progress: Progress = no_progress) -> ChunkResult:
        """One pair per text (seeded by seed, position and text: chunks and resumes reproduce); texts that
        give none are counted in ``report.dropped`` by reason."""
        report = FilterReport(n_sources=len(texts))
        rows = []
        for j, text in enumerate(texts):
            out = self.view(text, text_rng(seed, start + j, text, self.method))
            if isinstance(out, str):
                report.dropped[out] += 1
                continue
            anchor, positive, attempts = out
            report.n_generations += attempts
            report.n_kept += 1
            report.n_kept_first_try += attempts == 1
            rows.append({"index": start + j, "anchor": anchor, "positive": positive, "attempts": attempts})
        self.stats["generated_texts"] += len(texts)
        progress(len(texts))
        return ChunkResult(rows, report)


class CropAugmenter(_CheapSource):
    """``crop``: anchor and positive are two different random spans of the same text (see :func:`crop_spans`).

    Span lengths are ``uniform(min_fraction, max_fraction)`` of the text in words (at least
    ``min_words``). Texts of fewer than ``min_words + 1`` words are skipped and counted as ``too_short``;
    a text whose every span reads the same (word repeated) as ``identical``.
    """

    method = "crop"
    empty_hint = "crop needs texts of at least augmentation.min_words + 1 words (lower augmentation.min_words)"

    def __init__(self, name: str = "crop", min_fraction: float = 0.3, max_fraction: float = 0.6, min_words: int = 5,
                 retries: int = 3, chunk_size: int = 5000, max_source_chars: int = 20000) -> None:
        super().__init__()
        if not 0.0 < min_fraction <= max_fraction <= 1.0:
            raise EmbedkitError(f"augmentation.min_fraction={min_fraction} and max_fraction={max_fraction} must "
                                "satisfy 0 < min_fraction <= max_fraction <= 1 (fractions of the text in words)")
        if min_words < 1 or retries < 0:
            raise EmbedkitError(f"augmentation.min_words={min_words} must be >= 1 and retries={retries} >= 0")
        self.name, self.min_fraction, self.max_fraction = name, min_fraction, max_fraction
        self.min_words, self.retries = min_words, retries
        self.chunk_size, self.max_source_chars = chunk_size, max_source_chars

    def settings(self) -> dict:
        """The span fractions, the minimum span in words and the re-draws."""
        return {"min_fraction": self.min_fraction, "max_fraction": self.max_fraction, "min_words": self.min_words,
                "retries": self.retries}

    def view(self, text: str, rng: random.Random) -> tuple[str, str, int] | str:
        """Two different spans, or ``too_short`` / ``identical``."""
        if len(text.split()) < self.min_words + 1:
            return "too_short"
        return crop_spans(text, rng, self.min_fraction, self.max_fraction, self.min_words, self.retries) or "identical"


class FirstRestAugmenter(_CheapSource):
    """``first_rest``: anchor = the first sentence, positive = the rest of the text
    (:func:`split_first_sentence`); texts of one sentence are skipped and counted as ``one_sentence``."""

    method = "first_rest"
    empty_hint = "first_rest needs texts of two sentences or more (titles and one-liners have one; try crop)"

    def __init__(self, name: str = "first_rest", min_first_words: int = 3, chunk_size: int = 5000,
                 max_source_chars: int = 20000) -> None:
        super().__init__()
        if min_first_words < 1:
            raise EmbedkitError(f"augmentation.min_first_words={min_first_words} must be >= 1")
        self.name, self.min_first_words = name, min_first_words
        self.chunk_size, self.max_source_chars = chunk_size, max_source_chars

    def settings(self) -> dict:
        """The fewest words the first sentence must have (a shorter one runs on to the next sentence end)."""
        return {"min_first_words": self.min_first_words}

    def view(self, text: str, rng: random.Random) -> tuple[str, str, int] | str:
        """(first sentence, rest, 1), or ``one_sentence``."""
        split = split_first_sentence(text, self.min_first_words)
        return (*split, 1) if split else "one_sentence"


class DropoutAugmenter(_CheapSource):
    """``dropout`` (SimCSE): the positive is the text itself; the two views of a pair differ only by the
    model's dropout while training, so ``train.model_dropout`` must be > 0 (checked before any model work
    by :func:`check_dropout_views`, and again by the ``TrainingPlan``)."""

    method = "dropout"

    def __init__(self, name: str = "dropout", chunk_size: int = 5000, max_source_chars: int = 20000) -> None:
        super().__init__()
        self.name, self.chunk_size, self.max_source_chars = name, chunk_size, max_source_chars

    @property
    def generator(self) -> str:
        """No model: the views come from dropout at training time."""
        return "identity (views differ by model dropout while training)"

    def settings(self) -> dict:
        """None: the text is its own positive."""
        return {}

    def view(self, text: str, rng: random.Random) -> tuple[str, str, int] | str:
        """(text, text, 1)."""
        return text, text, 1


_DROPOUT_TARGETS = {"embedkit.augment.DropoutAugmenter", "embedkit.augment.sources.DropoutAugmenter"}
_TEXTS_TARGETS = {"embedkit.data.pairs.load_texts", "embedkit.data.load_texts"}


def _dropout_members(node: Mapping, path: str = "augmentation") -> list[str]:
    """The config paths of the ``dropout`` nodes in an augmentation config (itself, or members of ``mix``)."""
    found = [path] if node.get("_target_") in _DROPOUT_TARGETS else []
    methods = node.get("methods")
    if isinstance(methods, Mapping):
        for k, sub in methods.items():
            if isinstance(sub, Mapping):
                found += _dropout_members(sub, f"{path}.methods.{k}")
    return found


def check_dropout_views(augmentation: Mapping, pairs: Mapping, model_dropout: float) -> None:
    """Refuse, before any model work, a config whose positives are the texts themselves while
    ``train.model_dropout`` is 0: ``augmentation=dropout`` (or a ``dropout`` member of ``mix``), and
    ``pairs=texts`` with ``augmentation=none`` (which trains on dropout views too). Both views of such a
    pair would be the same embedding: no training signal. Raises :class:`EmbedkitError`; returns None."""
    if model_dropout > 0:
        return
    fix = ("Set train.model_dropout>0 (e.g. train.model_dropout=0.1, as SimCSE), or make the positive a different "
           "text with augmentation=crop or augmentation=first_rest")
    members = _dropout_members(augmentation)
    if members:
        which = ("augmentation=dropout" if members == ["augmentation"]
                 else f"augmentation={augmentation.get('name')} with a dropout member ({', '.join(members)})")
        raise EmbedkitError(f"{which} makes SimCSE pairs (the positive is the text itself): the two views differ "
                            f"only by the model's dropout, but train.model_dropout=0, so there is no training "
                            f"signal. {fix}")
    if augmentation.get("name") == "none" and pairs.get("_target_") in _TEXTS_TARGETS:
        raise EmbedkitError("pairs=texts with augmentation=none trains on SimCSE dropout views (the positive is the "
                            "text itself, as augmentation=dropout), but train.model_dropout=0, so there is no "
                            f"training signal. {fix}")
