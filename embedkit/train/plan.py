"""``TrainingPlan``: the training pairs tokenized once and the batch of every optimizer step, checked.

Building the plan needs only the tokenizer (no model copy, no forward pass), so ``embedkit.run`` builds it
before the evaluation that precedes training and hands it to the ``Trainer``: pairs that would train on
nothing (every in-batch negative masked as a false negative, SimCSE pairs without dropout, ...) stop the
run before any encoding, and the pairs are tokenized once per run.

Batches: epoch e is a permutation of the pairs drawn from ``torch.Generator().manual_seed(seed + e)``,
cut into ``len(pairs) // batch_size`` batches (the remainder is dropped); the run takes the first
``total_steps = min(max_steps, epochs * steps_per_epoch)`` batches of the epochs in order.
"""

from __future__ import annotations

import logging
import math

import torch

from embedkit.data.pairs import PairSet
from embedkit.embed.prompts import Prompt, PromptEnsemble, tokenize
from embedkit.errors import EmbedkitError
from embedkit.train.config import TrainConfig
from embedkit.train.distributed import chunk_groups, rank_and_world, rank_slices

# the trainer's logger: the warnings below kept the name they were logged under before this module existed
log = logging.getLogger("embedkit.train.trainer")

Sequence = tuple[int, ...]


class TrainingPlan:
    """The tokenized pairs and the per-step batch plan of one training run.

    Takes the tokenizer, the prompt the texts are wrapped in, the pairs, the ``TrainConfig`` (``batch_size``,
    ``chunk_size``, ``negatives``, ``max_length``, ``max_steps``, ``epochs``, ``mask_false_negatives``,
    ``model_dropout`` matter here), the seed of the batch order and the number of ranks (default: the
    current process group's). Raises ``EmbedkitError`` for a batch size the ranks or the pairs cannot
    supply and for pairs with no training signal.

    Attributes: ``anchor_ids``, ``positive_ids`` (and ``negative_ids`` or ``None``) hold the token ids of
    every pair, each text cut to ``max_length`` tokens before the prompt wraps it; ``steps_per_epoch``,
    ``total_steps``; ``step_batches[s]`` the global pair indices of step s.
    """

    def __init__(self, tokenizer, prompt: Prompt, pairs: PairSet, cfg: TrainConfig, seed: int = 0,
                 world: int | None = None) -> None:
        self.tokenizer, self.prompt, self.pairs, self.cfg, self.seed = tokenizer, prompt, pairs, cfg, seed
        self.world = rank_and_world()[1] if world is None else world
        if cfg.batch_size % self.world:
            raise EmbedkitError(f"train.batch_size={cfg.batch_size} must be divisible by the {self.world} ranks")
        if cfg.batch_size > len(pairs):
            raise EmbedkitError(f"train.batch_size={cfg.batch_size} is larger than the {len(pairs)} pairs of "
                                f"{pairs.name}; lower train.batch_size or give more pairs")
        self.steps_per_epoch = len(pairs) // cfg.batch_size
        self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        # the text is cut to max_length tokens before the prompt wraps it
        if isinstance(prompt, PromptEnsemble):
            raise EmbedkitError(f"prompt={prompt.name} is an ensemble: fine-tuning trains one prompt; pick one member")
        tok = lambda texts: tokenize(tokenizer, prompt, texts, cfg.max_length)  # noqa: E731
        anchors, positives = tok(pairs.anchors), tok(pairs.positives)
        negatives = tok(pairs.negatives) if pairs.negatives else None
        self.anchor_ids: list[Sequence] = [t.ids for t in anchors]
        self.positive_ids: list[Sequence] = [t.ids for t in positives]
        self.negative_ids: list[Sequence] | None = [t.ids for t in negatives] if negatives else None
        self._spans = ([t.text_span for t in anchors], [t.text_span for t in positives],
                       [t.text_span for t in negatives] if negatives else None)
        keys: dict[Sequence, int] = {}  # one integer per distinct token sequence (false negatives)
        self._anchor_key = torch.tensor([keys.setdefault(t, len(keys)) for t in self.anchor_ids])
        self._positive_key = torch.tensor([keys.setdefault(t, len(keys)) for t in self.positive_ids])
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.step_batches: list[list[int]] = [b for e in range(epochs) for b in self.batches(e)][:self.total_steps]
        self._check()

    # -- the batch plan --------------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """The ``steps_per_epoch`` batches (lists of ``batch_size`` global pair indices) of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.pairs), generator=g).tolist()
        b = self.cfg.batch_size
        return [order[i:i + b] for i in range(0, self.steps_per_epoch * b, b)]

    def batch(self, step: int) -> list[int]:
        """The global pair indices of optimizer step ``step`` (0-based, below ``total_steps``)."""
        return self.step_batches[step]

    def epoch(self, step: int) -> int:
        """The epoch (0-based) that step ``step`` belongs to."""
        return step // self.steps_per_epoch

    def length_sorted(self, batch: list[int]) -> list[int]:
        """``batch`` with every rank's slice sorted longest pair first (anchor + positive tokens), so
        GradCache's chunks hold pairs of similar length (less padding); its loss sees the whole batch
        whatever the chunks hold. Every rank sorts every slice the same way."""
        size = lambda i: -(len(self.anchor_ids[i]) + len(self.positive_ids[i]))  # noqa: E731
        return [i for sl in rank_slices(batch, self.world) for i in sorted(sl, key=size)]

    def sequences(self, idx: list[int]) -> list[Sequence]:
        """The token ids to encode for the pairs ``idx``: their anchors, then their positives, then (with
        hard negatives) their negatives."""
        seqs = [self.anchor_ids[i] for i in idx] + [self.positive_ids[i] for i in idx]
        if self.negative_ids is not None:
            seqs += [self.negative_ids[i] for i in idx]
        return seqs

    def spans(self, idx: list[int]) -> list[tuple[int, int]]:
        """The text spans (``Tokenized.text_span``) of ``sequences(idx)``, in the same order."""
        a, p, n = self._spans
        return [a[i] for i in idx] + [p[i] for i in idx] + ([n[i] for i in idx] if n is not None else [])

    def same_text(self, idx: list[int]) -> torch.Tensor:
        """[n, n] bool: off-diagonal pairs of ``idx`` with the same anchor or the same positive tokens
        (false negatives)."""
        a, p = self._anchor_key[idx], self._positive_key[idx]
        ex = (a[:, None] == a[None, :]) | (p[:, None] == p[None, :])
        return ex.fill_diagonal_(False)

    # -- refusing pairs with no training signal -------------------------------------------------------

    def _no_negatives(self, idx: list[int]) -> bool:
        if len(idx) < 2:
            return True
        if not self.cfg.mask_false_negatives:
            return False
        return int(self.same_text(idx).sum()) == len(idx) * (len(idx) - 1)

    def _check(self) -> None:
        """Refuse pairs that would train on nothing: a batch whose every in-batch negative is masked as a
        false negative, or SimCSE pairs (anchor == positive) whose two views cannot differ."""
        cfg, name = self.cfg, self.pairs.source or self.pairs.name
        if self.negative_ids is not None:  # hard negatives are negatives whatever the batch holds
            return
        if cfg.negatives == "chunk" and cfg.chunk_size * self.world < 2:
            raise EmbedkitError(f"train.negatives=chunk with train.chunk_size={cfg.chunk_size} on {self.world} "
                                "rank(s): every loss sees a single pair and no negatives; raise train.chunk_size "
                                "or use train.negatives=full")
        for step, batch in enumerate(self.step_batches):
            groups = [batch] if cfg.negatives == "full" else chunk_groups(batch, self.world, cfg.chunk_size)
            if all(self._no_negatives(g) for g in groups):
                raise EmbedkitError(
                    f"{name}: the batch of step {step + 1} ({len(batch)} pairs) has no negatives left: every "
                    "other pair in it has the same anchor or the same positive (after cutting to "
                    f"train.max_length={cfg.max_length} tokens), so all in-batch negatives are masked as false "
                    "negatives and the loss would be 0 (training on nothing). Deduplicate the pairs, add more "
                    "distinct pairs, or set train.mask_false_negatives=false")
        same = sum(a == p for a, p in zip(self.anchor_ids, self.positive_ids))
        if same and cfg.model_dropout == 0:
            if same == len(self.anchor_ids):
                raise EmbedkitError(
                    f"{name}: every anchor equals its positive (SimCSE-style pairs) but train.model_dropout=0, so "
                    "both views of a pair are the same embedding and there is no training signal (LoRA dropout "
                    "does not help: lora_B starts at 0). Set train.model_dropout>0 (e.g. train.model_dropout=0.1) "
                    "or make positives with an augmentation (augmentation=crop, first_rest or noise; augmentation=dropout is SimCSE and needs train.model_dropout>0 too)")
            log.warning("%s: %d of %d pairs have anchor == positive; with train.model_dropout=0 their two views "
                        "are identical (set train.model_dropout>0 for SimCSE pairs)", name, same, len(self.anchor_ids))
