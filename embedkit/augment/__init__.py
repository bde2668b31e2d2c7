"""Synthetic positive pairs (the ``augmentation`` config group): views made from anchor texts by noise,
LLM paraphrasing and back-translation, with the durable, resumable pair store that ``embedkit-pairs``
and training share.

Each option of ``conf/augmentation`` instantiates one class re-exported here; whatever the method, the
trainer sees the same contract (:class:`Augmenter`)::

    aug = hydra.utils.instantiate(cfg.augmentation)        # any option but `none`
    rows = aug.make_pairs(texts, cache_dir, seed=0)         # [{"anchor": text, "positive": view, ...}]

Methods (the paper's, see ``../shared/docs/paper.md``, "Positive pairs"):

* :class:`NoiseAugmenter` (``noise``): word deletion (p 0.1), word swaps, adjacent-character swaps (p 0.05).
  No model.
* :class:`ParaphraseAugmenter` (``paraphrase``): a chat model rewrites each text following one of five
  instructions picked per sentence with a seeded RNG (more detail, simpler language, as a teacher, a
  metaphor, a follow-up question), through the model's chat template, with sampling, retries and filters.
* :class:`BackTranslationAugmenter` (``backtranslation``): text -> pivot language (German) -> English,
  either with a real translation model pair (e.g. MarianMT ids, online) or, offline, with the chat model
  in both directions.
* :class:`MixedAugmenter` (``mix``): several methods at once (every method on every text, or a seeded split).

Cheap sources for unlabelled texts (``pairs=texts``), no model (:mod:`embedkit.augment.sources`):

* :class:`CropAugmenter` (``crop``): two different random spans of the same text.
* :class:`FirstRestAugmenter` (``first_rest``): first sentence -> rest of the text.
* :class:`DropoutAugmenter` (``dropout``): SimCSE, the text is its own positive (needs ``train.model_dropout > 0``,
  :func:`check_dropout_views`).

Generated text is cleaned (:func:`clean_generation`) and checked by :class:`PairFilter` (empty, identical
to the source, too short/long, wrong script, prompt echo); rejected texts are re-generated up to
``retries`` times, and what survives is reported (:class:`FilterReport`).

Modules: ``base`` (the :class:`Augmenter` contract and shared seeding helpers), ``filters``, ``chat``
(:class:`ChatModel` and the chat-model methods' base), ``noise``, ``paraphrase``, ``backtranslation``,
``mix``, ``sources``, and ``store`` (the on-disk pair cache: :func:`generate_pairs`, :func:`pair_set_dir`).
"""

from embedkit.augment.base import Augmenter, ChunkResult
from embedkit.augment.filters import FilterReport, PairFilter, clean_generation, script_counts
from embedkit.augment.store import PairResult, generate_pairs, pair_set_dir
from embedkit.augment.chat import ChatAugmenter, ChatModel
from embedkit.augment.noise import NoiseAugmenter, delete_words, swap_chars, swap_words
from embedkit.augment.paraphrase import PAPER_INSTRUCTIONS, PAPER_SYSTEM_PROMPT, ParaphraseAugmenter
from embedkit.augment.backtranslation import BackTranslationAugmenter
from embedkit.augment.mix import MixedAugmenter
from embedkit.augment.sources import (CropAugmenter, DropoutAugmenter, FirstRestAugmenter, check_dropout_views,
                                      crop_spans, split_first_sentence)

__all__ = ["PAPER_INSTRUCTIONS", "PAPER_SYSTEM_PROMPT", "Augmenter",
           "BackTranslationAugmenter", "ChatAugmenter", "ChatModel", "ChunkResult", "CropAugmenter",
           "DropoutAugmenter", "FilterReport", "FirstRestAugmenter", "MixedAugmenter", "NoiseAugmenter", "PairFilter",
           "PairResult", "ParaphraseAugmenter", "check_dropout_views", "clean_generation", "crop_spans",
           "delete_words", "generate_pairs", "pair_set_dir", "script_counts", "split_first_sentence", "swap_chars",
           "swap_words"]
