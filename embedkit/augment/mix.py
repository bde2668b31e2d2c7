"""Several augmentation methods at once: the ``mix`` option (:class:`MixedAugmenter`), every method on every
text or a seeded split of the texts between them. Each member keeps its own pair cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from embedkit.augment.base import Augmenter, text_rng
from embedkit.augment.filters import FilterReport
from embedkit.errors import EmbedkitError

__all__ = ["MixedAugmenter"]


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
        """The members' generators: ``'<label>: <generator> + ...'``."""
        return " + ".join(f"{k}: {m.generator}" for k, m in self.methods.items())

    def settings(self) -> dict:
        """The mode and each member's method and settings."""
        return {"mode": self.mode, "methods": {k: {"method": m.method, **m.settings()} for k, m in self.methods.items()}}

    def make_pairs(self, texts: list[str], cache_dir: str | Path, seed: int = 0, ids: Sequence[str] | None = None,
                   show_progress: bool = True) -> list[dict]:
        """The rows of every member (members in label order), each made and cached by that member's own
        ``make_pairs``; ``last_report`` adds up the members' reports."""
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
