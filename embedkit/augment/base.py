"""The contract every augmentation method meets, and the helpers the methods share.

Each option of ``conf/augmentation`` instantiates a subclass of :class:`Augmenter`; whatever the method,
the trainer sees the same contract::

    aug = hydra.utils.instantiate(cfg.augmentation)        # any option but `none`
    rows = aug.make_pairs(texts, cache_dir, seed=0)         # [{"anchor": text, "positive": view, ...}]

``make_pairs`` goes through :mod:`embedkit.augment.store`, which keys an on-disk cache by a hash of (texts,
method, generator, settings, seed), writes the pairs in chunks so an interrupted generation resumes, and
records provenance in every row. A subclass only knows how to turn a chunk of texts into views
(:meth:`Augmenter.generate_chunk`, returning a :class:`ChunkResult`).

Shared helpers: seeded randomness that does not depend on batching or chunking (:func:`text_rng`,
:func:`hash_seed`), the progress callback type (:data:`Progress`, :func:`no_progress`) and
:func:`to_plain` for nested Hydra config.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from embedkit.augment.filters import FilterReport
from embedkit.augment.store import generate_pairs

__all__ = ["Augmenter", "ChunkResult", "Progress", "hash_seed", "no_progress", "text_rng", "to_plain"]

#: A progress callback: called with the number of texts just finished.
Progress = Callable[[int], Any]


def no_progress(_: int) -> None:
    """The default :data:`Progress` callback: takes the number of finished texts, does nothing, returns None."""
    return None


def text_rng(seed: int, index: int, text: str, salt: str = "") -> random.Random:
    """A ``random.Random`` that depends only on (seed, position, text): chunks and resumes reproduce."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{salt}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def to_plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes for nested config) -> plain dicts/lists; any other value
    is returned as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass
class ChunkResult:
    """Output of one chunk: kept rows (anchor, positive, per-row provenance) and the chunk's report."""

    rows: list[dict]
    report: FilterReport


class Augmenter:
    """Base class: turns texts into (anchor, positive) rows; caching and provenance live in
    :mod:`embedkit.augment.store`.

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
        """What produces the views (a model id, or a description), for provenance and cache keys."""
        return "none"

    def settings(self) -> dict:
        """Everything that changes the output besides texts and seed (goes into cache keys and rows)."""
        raise NotImplementedError

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int,
                       progress: Progress = no_progress) -> ChunkResult:
        """Views for ``texts`` (positions ``start...`` of the whole input); rows carry ``index`` = position."""
        raise NotImplementedError

    def make_pairs(self, texts: list[str], cache_dir: str | Path, seed: int = 0, ids: Sequence[str] | None = None,
                   show_progress: bool = True) -> list[dict]:
        """Rows ``{"anchor", "positive", "source_id", "method", "generator", "settings", "seed", ...}``.

        Cached under ``cache_dir``: the same texts, settings and seed return the stored rows without
        any generation. Sources whose every attempt was filtered out are left out (see ``last_report``);
        if none survives an :class:`EmbedkitError` gives the counts.
        """
        result = generate_pairs(self, texts, cache_dir, seed=seed, ids=ids, show_progress=show_progress)
        return result.rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.settings()})"
