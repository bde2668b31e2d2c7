"""Cheap positive views by rule-based noise, no model: word deletion, word swaps and adjacent-character
swaps (the paper's code), as functions on one text and as the ``noise`` method (:class:`NoiseAugmenter`).
"""

from __future__ import annotations

import random
from typing import Sequence

from embedkit.augment.base import Augmenter, ChunkResult, Progress, no_progress, text_rng
from embedkit.augment.filters import FilterReport, normalize_text
from embedkit.errors import EmbedkitError

__all__ = ["NoiseAugmenter", "delete_words", "swap_chars", "swap_words"]


def _require_words(text: str, what: str) -> list[str]:
    """The words of ``text``; an empty text is an input error named after the function ``what``."""
    words = text.split()
    if not words:
        raise EmbedkitError(f"{what}: got an empty text; noise needs at least one word (drop blank texts first)")
    return words


def delete_words(text: str, p: float, rng: random.Random) -> str:
    """Drop each word independently with probability ``p``; at least one word always survives.

    Whitespace is normalised (words are re-joined with single spaces). If every word was drawn for
    deletion, one of them (chosen with ``rng``) is kept, so the result is never empty.
    """
    if not 0.0 <= p <= 1.0:
        raise EmbedkitError(f"word deletion probability must be in [0, 1], got {p}")
    words = _require_words(text, "delete_words")
    kept = [w for w in words if rng.random() >= p]
    if not kept:
        kept = [words[rng.randrange(len(words))]]
    return " ".join(kept)


def swap_words(text: str, n: int, rng: random.Random, adjacent: bool = True) -> str:
    """Swap ``n`` pairs of words: neighbours (``adjacent=True``) or any two positions (the paper's code).

    A one-word text is returned as is (there is nothing to swap).
    """
    if n < 0:
        raise EmbedkitError(f"number of word swaps must be >= 0, got {n}")
    words = _require_words(text, "swap_words")
    if len(words) < 2:
        return " ".join(words)
    for _ in range(n):
        if adjacent:
            i = rng.randrange(len(words) - 1)
            j = i + 1
        else:
            i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def swap_chars(text: str, p: float, rng: random.Random) -> str:
    """In each word of 2+ characters, with probability ``p``, swap two adjacent characters (a typo).

    The number of characters never changes, so the result is never empty for a non-empty input.
    """
    if not 0.0 <= p <= 1.0:
        raise EmbedkitError(f"character swap probability must be in [0, 1], got {p}")
    words = _require_words(text, "swap_chars")
    out = []
    for w in words:
        if len(w) >= 2 and rng.random() < p:
            i = rng.randrange(len(w) - 1)
            w = w[:i] + w[i + 1] + w[i] + w[i + 2:]
        out.append(w)
    return " ".join(out)


class NoiseAugmenter(Augmenter):
    """Cheap views by noise, applied in order: word deletion, word swaps, character swaps.

    Defaults follow the paper's code: each word dropped with p 0.1, one pair of words swapped
    (``adjacent_swap=False`` swaps two random words as the paper's code does; the default swaps
    neighbours, which keeps the sentence readable), adjacent characters swapped inside a word with p 0.05.
    Seeded per text (seed, position, text). A view equal to its source (possible for very short texts)
    is re-drawn up to ``retries`` times and then kept as is: the pair is still valid (SimCSE-style).
    """

    method = "noise"

    def __init__(self, name: str = "noise", word_delete_p: float = 0.1, word_swap_n: int = 1,
                 adjacent_swap: bool = True, char_swap_p: float = 0.05, retries: int = 3,
                 chunk_size: int = 2000, max_source_chars: int = 4000) -> None:
        super().__init__()
        for label, p in (("word_delete_p", word_delete_p), ("char_swap_p", char_swap_p)):
            if not 0.0 <= p <= 1.0:
                raise EmbedkitError(f"augmentation.{label} must be a probability in [0, 1], got {p}")
        if word_swap_n < 0:
            raise EmbedkitError(f"augmentation.word_swap_n must be >= 0, got {word_swap_n}")
        self.name, self.word_delete_p, self.word_swap_n = name, word_delete_p, word_swap_n
        self.adjacent_swap, self.char_swap_p, self.retries = adjacent_swap, char_swap_p, retries
        self.chunk_size, self.max_source_chars = chunk_size, max_source_chars

    @property
    def generator(self) -> str:
        """No model: ``'rule-based noise (no model)'``."""
        return "rule-based noise (no model)"

    def settings(self) -> dict:
        """The noise probabilities and counts (see the class)."""
        return {"word_delete_p": self.word_delete_p, "word_swap_n": self.word_swap_n,
                "adjacent_swap": self.adjacent_swap, "char_swap_p": self.char_swap_p, "retries": self.retries}

    def noise(self, text: str, rng: random.Random) -> str:
        """One noised view of ``text`` (never empty)."""
        out = text
        if self.word_delete_p > 0:
            out = delete_words(out, self.word_delete_p, rng)
        if self.word_swap_n > 0:
            out = swap_words(out, self.word_swap_n, rng, adjacent=self.adjacent_swap)
        if self.char_swap_p > 0:
            out = swap_chars(out, self.char_swap_p, rng)
        return " ".join(out.split())

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int,
                       progress: Progress = no_progress) -> ChunkResult:
        """One noised view per text (seeded by seed, position and text); a view equal to its source is
        re-drawn up to ``retries`` times, then kept and counted as ``identical_kept``."""
        report = FilterReport(n_sources=len(texts))
        rows = []
        for j, text in enumerate(texts):
            rng = text_rng(seed, start + j, text, "noise")
            view = self.noise(text, rng)
            attempts = 1
            while normalize_text(view) == normalize_text(text) and attempts <= self.retries:
                view = self.noise(text, rng)
                attempts += 1
            report.n_generations += attempts
            report.n_kept += 1
            report.n_kept_first_try += attempts == 1
            if normalize_text(view) == normalize_text(text):
                report.rejected["identical_kept"] += 1
            rows.append({"index": start + j, "anchor": text, "positive": view, "attempts": attempts})
        self.stats["generated_texts"] += len(texts)
        progress(len(texts))
        return ChunkResult(rows, report)
