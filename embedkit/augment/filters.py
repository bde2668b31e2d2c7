"""Cleaning and checking generated views: :func:`clean_generation` reduces a chat model's answer to the
rewritten text, :class:`PairFilter` accepts or rejects it against its source (empty, identical to the
source, too short/long, wrong script or language, repetitive, prompt echo), and :class:`FilterReport`
counts what survived. Rejected texts are re-generated up to ``retries`` times by the methods
(:mod:`embedkit.augment.chat`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from embedkit.errors import EmbedkitError

__all__ = ["FilterReport", "PairFilter", "clean_generation", "normalize_text", "script_counts"]

_CJK_PREFIXES = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC", "HALFWIDTH KATAKANA")


def _script(ch: str) -> str | None:
    """The script of a letter ('LATIN', 'CJK', 'CYRILLIC', ...) or None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if name.startswith(_CJK_PREFIXES):
        return "CJK"
    return name.split(" ", 1)[0] or None


def script_counts(text: str) -> Counter:
    """How many letters of each script ``text`` has: a Counter such as ``{"LATIN": 40, "CJK": 2}``."""
    return Counter(s for s in map(_script, text) if s)


def normalize_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of ``text`` (a str), used for identity and echo
    checks: two texts that differ only in case, punctuation or spacing give the same string."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


_PREAMBLE = re.compile(
    r"^\s*(?:sure|certainly|okay|ok|of course|absolutely|here(?:'s| is| are)|the answer|the original|the (?:rewritten|simplified|"
    r"paraphrased|translated|english|german)|rewritten|paraphrased?|simplified|simpler|translation|"
    r"translated|explanation|metaphor|follow-up question|question|answer|output|english|german|"
    r"in (?:simpler|plain) (?:language|terms))\b[^\n:]{0,80}:[ \t]*\n?",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’«»„"


def clean_generation(text: str, finished: bool = True) -> str:
    """Reduce a chat model's answer to the rewritten text.

    Removes a leading preamble ("Sure! Here is the paraphrase:", "Rewritten text:"), keeps the first
    paragraph (small models often append a second version or a comment), joins its lines, strips
    wrapping quotes, and when generation hit ``max_new_tokens`` (``finished=False``) cuts the dangling
    half-sentence at the last sentence end (if one lies in the second half).
    """
    text = text.strip()
    for _ in range(2):
        new = _PREAMBLE.sub("", text, count=1).strip()
        if new == text:
            break
        text = new
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    text = " ".join(paragraphs[0].split()) if paragraphs else ""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if not finished and text:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        if ends and ends[-1] >= len(text) // 2:
            text = text[: ends[-1]]
    return text.strip()


_EN_FUNCTION_WORDS = frozenset(
    "the a an of and or to in on at for with from by as is are was were be been it its this that these those "
    "which who what when where how not no but if then than so there their they he she his her we you i".split())
#: frequent function words of German, French and Spanish that are not English words
_OTHER_FUNCTION_WORDS = frozenset(
    "der das und ist nicht ein eine einen mit für von zu den dem des im sich auch wie wird sind "
    "le la les et est une des du pour dans qui sur pas avec "
    "el los las y es que del para con por una se como".split())


def _function_word_shares(words: Sequence[str]) -> tuple[float, float]:
    """Shares of English and of (German/French/Spanish) function words among ``words``."""
    if not words:
        return 0.0, 0.0
    en = sum(w in _EN_FUNCTION_WORDS for w in words)
    other = sum(w in _OTHER_FUNCTION_WORDS for w in words)
    return en / len(words), other / len(words)


@dataclass
class PairFilter:
    """Checks one generated view against its source; :meth:`check` returns a reason or None (keep).

    Reasons, in the order they are tested:

    * ``empty``: nothing left after cleaning.
    * ``prompt_echo``: the answer repeats the instruction or system prompt, or contains chat-template
      markup (``<|im_start|>``, ``assistant:``) -- the model talked about the task instead of doing it.
    * ``wrong_script``: CJK characters when the source has none (the paper retried these), or more than
      ``max_foreign_script_share`` of the letters in a script the source does not use.
    * ``wrong_language`` (``language="en"``; null turns it off): the source reads as English (at least
      10% English function words) but the answer does not: fewer English function words than common
      German/French/Spanish ones, or under a third of the source's share. Catches a back-translation
      that stayed in German, which the script check cannot see.
    * ``repetitive``: a degenerate loop ("der Idee der Idee der Idee ..."): of 12+ words, fewer than
      ``min_distinct_trigram_share`` of the word trigrams are distinct.
    * ``identical``: equal to the source up to case, punctuation and whitespace.
    * ``too_short`` / ``too_long``: word count below ``max(min(min_words, n_src), min_length_ratio *
      n_src)`` or above ``max_length_ratio * n_src + length_slack_words`` (the slack lets a five-word
      sentence be rewritten "with more detail").
    """

    min_length_ratio: float = 0.3
    max_length_ratio: float = 4.0
    length_slack_words: int = 15
    min_words: int = 3
    max_foreign_script_share: float = 0.2
    language: str | None = "en"
    min_distinct_trigram_share: float = 0.5
    check_identical: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_length_ratio <= self.max_length_ratio:
            raise EmbedkitError(
                f"filters: need 0 <= min_length_ratio <= max_length_ratio, got {self.min_length_ratio} and "
                f"{self.max_length_ratio}")

    def check(self, source: str, candidate: str, prompts: Sequence[str] = ()) -> str | None:
        """The first reason (see the class) ``candidate`` fails as a view of ``source``, or None to keep it;
        ``prompts`` are the instruction texts whose repetition counts as prompt echo."""
        if not candidate or not candidate.strip():
            return "empty"
        cand_norm = normalize_text(candidate)
        if not cand_norm:
            return "empty"
        if re.search(r"<\|[a-z_]+\|>|^\s*(?:assistant|user|system)\s*:", candidate, re.IGNORECASE):
            return "prompt_echo"
        src_norm = normalize_text(source)
        for prompt in prompts:
            head = " ".join(normalize_text(prompt).split()[:6])
            if len(head.split()) >= 4 and head in cand_norm and head not in src_norm:
                return "prompt_echo"
        src_scripts, cand_scripts = script_counts(source), script_counts(candidate)
        if cand_scripts.get("CJK") and not src_scripts.get("CJK"):
            return "wrong_script"
        n_letters = sum(cand_scripts.values())
        foreign = sum(c for s, c in cand_scripts.items() if s not in src_scripts and s != "LATIN")
        if n_letters and foreign / n_letters > self.max_foreign_script_share:
            return "wrong_script"
        cand_words = cand_norm.split()
        if self.language == "en":
            src_en, _ = _function_word_shares(src_norm.split())
            cand_en, cand_other = _function_word_shares(cand_words)
            if src_en >= 0.1 and (cand_other > cand_en or cand_en < src_en / 3):
                return "wrong_language"
        if len(cand_words) >= 12:
            grams = list(zip(cand_words, cand_words[1:], cand_words[2:]))
            if len(set(grams)) / len(grams) < self.min_distinct_trigram_share:
                return "repetitive"
        if self.check_identical and cand_norm == src_norm:
            return "identical"
        n_src, n_cand = len(source.split()), len(candidate.split())
        if n_cand < max(min(self.min_words, n_src), self.min_length_ratio * n_src):
            return "too_short"
        if n_cand > self.max_length_ratio * n_src + self.length_slack_words:
            return "too_long"
        return None


@dataclass
class FilterReport:
    """What happened to the sources of one generation: kept, dropped (final reason), rejected attempts."""

    n_sources: int = 0
    n_kept: int = 0
    n_kept_first_try: int = 0
    n_generations: int = 0
    dropped: Counter = field(default_factory=Counter)      # source -> final reason it was dropped
    rejected: Counter = field(default_factory=Counter)     # every rejected attempt, by reason

    @property
    def n_dropped(self) -> int:
        """How many sources ended without a view."""
        return sum(self.dropped.values())

    @property
    def kept_share(self) -> float:
        """Kept sources / sources (0.0 when there were none)."""
        return self.n_kept / self.n_sources if self.n_sources else 0.0

    def add(self, other: "FilterReport") -> None:
        """Add the counts of ``other`` (another chunk or method) to this report, in place."""
        self.n_sources += other.n_sources
        self.n_kept += other.n_kept
        self.n_kept_first_try += other.n_kept_first_try
        self.n_generations += other.n_generations
        self.dropped.update(other.dropped)
        self.rejected.update(other.rejected)

    def to_dict(self) -> dict:
        """The counts as a JSON-ready dict (what ``meta.json`` and the chunk files store)."""
        return {"n_sources": self.n_sources, "n_kept": self.n_kept, "n_dropped": self.n_dropped,
                "n_kept_first_try": self.n_kept_first_try, "n_generations": self.n_generations,
                "kept_share": round(self.kept_share, 4), "dropped": dict(sorted(self.dropped.items())),
                "rejected": dict(sorted(self.rejected.items()))}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FilterReport":
        """The report that :meth:`to_dict` wrote (missing keys count 0)."""
        return cls(n_sources=d.get("n_sources", 0), n_kept=d.get("n_kept", 0),
                   n_kept_first_try=d.get("n_kept_first_try", 0), n_generations=d.get("n_generations", 0),
                   dropped=Counter(d.get("dropped", {})), rejected=Counter(d.get("rejected", {})))

    def summary(self) -> str:
        """One line: '12 of 16 kept (75%); dropped: identical 3, too_long 1; 21 generations'."""
        text = f"{self.n_kept} of {self.n_sources} kept ({100 * self.kept_share:.0f}%)"
        if self.dropped:
            text += "; dropped: " + ", ".join(f"{r} {c}" for r, c in self.dropped.most_common())
        if self.rejected:
            text += "; rejected attempts: " + ", ".join(f"{r} {c}" for r, c in self.rejected.most_common())
        return text + f"; {self.n_generations} generations"
