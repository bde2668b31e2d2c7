"""Positive views made from anchor texts: noise, LLM paraphrase, back-translation and mixes of them
(config group ``augmentation``), with the durable, resumable pair store that `embedkit-pairs` and
training share."""

from embedkit.augment.base import (
    Augmenter, BackTranslationAugmenter, ChatModel, FilterReport, MixedAugmenter, NoiseAugmenter, PairFilter,
    ParaphraseAugmenter,
)

__all__ = ["Augmenter", "BackTranslationAugmenter", "ChatModel", "FilterReport", "MixedAugmenter",
           "NoiseAugmenter", "PairFilter", "ParaphraseAugmenter"]
