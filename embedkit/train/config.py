"""``TrainConfig``: the settings of the ``train`` config group, checked on construction.

This dataclass is the one place the defaults are stated; ``conf/train/lora.yaml`` repeats them to
document them for the command line (``tests/test_train.py`` keeps the two equal). ``embedkit.schema``
merges the composed ``train`` node into ``OmegaConf.structured(TrainConfig)`` (types, unknown keys) and
``__post_init__`` checks the ranges. ``fingerprint`` names the checkpoint folder: changing which fields it
hashes would orphan every checkpoint on users' disks (``tests/test_keys.py`` pins it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from embedkit.errors import EmbedkitError

# settings that change where or how often checkpoints are written, or when a run stops, not what one step does
# (a run stopped by its time budget resumes from the same checkpoints with another budget or none)
# fields added later: hashed only when set, so earlier keys still hold
_HASHED_IF_SET = {"fit_budget": False, "lora_depth": 1.0, "attention": "auto", "packing": "false",
                  "partition": "positives", "hardness": 0.0}
_NOT_HASHED = ("resume", "save_every", "keep_checkpoints", "export", "max_minutes", "push_to_hub")


@dataclass
class TrainConfig:
    """Settings of the ``train`` config group; every field has the default of ``conf/train/lora.yaml``.

    The field order is that of earlier versions (it is the order error messages list the keys in); the
    groups below say what each field does.
    """

    name: str = "lora"
    """Name of the option (``lora``, ``lora_paper``, ...); part of the checkpoint folder's name."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_depth: float = 1.0
    """LoRA adapter (peft): rank ``r``, scale ``alpha``, LoRA dropout, the names of the linear layers
    that get an adapter (the last component of the module name), and the share of the blocks, counted from
    the top (the highest block pooling reads), that get them: below those the model stays frozen and the
    backward pass stops, so 0.5 makes a step about 1.5x cheaper (``make bench``, section recipe)."""

    temperature: float = 0.2
    symmetric: bool = False
    margin: float = 0.0
    partition: str = "positives"
    hardness: float = 0.0
    """InfoNCE over cosine similarities (``embedkit.train.losses.info_nce``): temperature, whether the
    positives -> anchors direction is averaged in, an additive margin on the positive, and the softmax's
    candidates: ``positives`` (the paper: the batch's positives and hard negatives) or ``gte`` (GTE's improved
    contrastive loss, Li et al. 2023: also the other anchors, anchors -> the positive and the other positives,
    about 4x the negatives from the same encodings), and LLaVE's hardness weighting (Lan et al. 2025; 0: off):
    a negative's logit gains ``hardness`` x its (gradient-free) similarity, so near negatives count more."""

    batch_size: int = 120
    chunk_size: int = 12
    negatives: str = "full"
    max_length: int = 100
    """Batching: pairs per optimizer step, pairs per forward pass (bounds memory), ``full`` (GradCache:
    every loss sees ``batch_size``-way negatives) or ``chunk`` (gradient accumulation: ``chunk_size``-way),
    and text tokens per text before the prompt wraps it."""

    max_steps: int = 100
    epochs: int = 1
    max_minutes: float | None = None
    fit_budget: bool = False
    scheduler: str = "linear"
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    model_dropout: float = 0.05
    attention: str = "auto"
    packing: str = "false"
    """Schedule and numerics: steps are ``min(max_steps, epochs * steps_per_epoch)``; ``max_minutes`` (None: no
    budget) is a wall-time budget for the training loop: the run stops after the step during which it ran
    out, saves a checkpoint and the adapter as at a normal end and records ``stopped_by: budget`` (the LR
    schedule stays planned for all steps; ``resume`` continues it; not hashed); ``fit_budget`` (needs
    ``max_minutes``) times the first steps and re-plans the schedule to the steps the budget holds on this
    machine (at most the planned ones), so the LR decay completes within the budget; the transformers
    scheduler and its warmup; gradient clipping; ``auto`` (bf16 autocast on CUDA and bf16 CPUs, else fp32),
    ``fp32``, ``bf16`` or ``fp16``; activation checkpointing; the attention dropout while training (the
    paper's "model dropout": SimCSE pairs, anchor == positive, need it > 0); the attention kernel of the
    training passes on CPU (``embedkit.train.lora.attention_kernel``): ``auto`` (the math kernel where the
    attention weights it keeps for the backward stay small, short sequences: faster there; else fused),
    ``math`` or ``fused`` (torch's flash kernel for CPU, the least memory). GPUs always use the fused one;
    padding-free training passes (``embedkit.embed.packing``, as ``encode.packing``): ``auto`` packs on the
    CPU (a step's texts in one row, no padding), ``true`` also on CUDA (varlen flash attention, not yet run
    on a GPU), ``false`` runs padded passes grouped by width."""

    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    """Checkpoints: written atomically every ``save_every`` steps (and at the last), the newest
    ``keep_checkpoints`` kept; ``resume`` continues from the newest. None of the three is hashed."""

    mask_false_negatives: bool = True
    export: bool = False
    push_to_hub: str | None = None
    """Also: identical anchors or positives in one batch are not counted as negatives; ``export`` also
    writes the merged model as a sentence-transformers folder with a model card; ``push_to_hub`` (a Hub
    repo id, None: no upload) uploads that folder after the run and implies ``export`` (neither is hashed)."""

    def __post_init__(self) -> None:
        checks = [
            (self.negatives in ("full", "chunk"), f"train.negatives={self.negatives!r}: use 'full' or 'chunk'"),
            (self.batch_size >= 2, f"train.batch_size={self.batch_size}: in-batch negatives need >= 2"),
            (self.chunk_size >= 1, f"train.chunk_size={self.chunk_size} must be >= 1"),
            (self.max_steps >= 1, f"train.max_steps={self.max_steps} must be >= 1"),
            (self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"train.max_minutes={self.max_minutes} must be > 0 (null: no time budget)"),
            (not self.fit_budget or self.max_minutes is not None,
             "train.fit_budget=true fits the schedule to train.max_minutes: set train.max_minutes too"),
            (self.partition in ("positives", "gte"),
             f"train.partition={self.partition!r}: use 'positives' (the batch's positives) or 'gte' (GTE's "
             "improved contrastive loss)"),
            (not (self.partition == "gte" and self.symmetric),
             "train.partition=gte already holds the positives -> anchors direction: set train.symmetric=false"),
            (self.hardness >= 0, f"train.hardness={self.hardness} must be >= 0 (0: off; LLaVE uses 9)"),
            (self.temperature > 0, f"train.temperature={self.temperature} must be > 0"),
            (self.r >= 1, f"train.r={self.r} (LoRA rank) must be >= 1"),
            (self.alpha > 0, f"train.alpha={self.alpha} must be > 0"),
            (0 <= self.dropout < 1, f"train.dropout={self.dropout} must be in [0, 1)"),
            (0 <= self.model_dropout < 1, f"train.model_dropout={self.model_dropout} must be in [0, 1)"),
            (self.max_length >= 1, f"train.max_length={self.max_length} must be >= 1"),
            (self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0"),
            (self.max_grad_norm > 0, f"train.max_grad_norm={self.max_grad_norm} must be > 0"),
            (self.save_every >= 1, f"train.save_every={self.save_every} must be >= 1"),
            (self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"train.precision={self.precision!r}: use auto, fp32, bf16 or fp16"),
            (0 < self.lora_depth <= 1,
             f"train.lora_depth={self.lora_depth} must be in (0, 1]: the share of the blocks, from the top, "
             "that get LoRA (1: all)"),
            (str(self.packing).lower() in ("auto", "true", "false"),
             f"train.packing={self.packing!r}: use auto, true or false"),
            (self.attention in ("auto", "math", "fused"),
             f"train.attention={self.attention!r}: use auto, math or fused"),
            (self.scheduler in ("linear", "cosine", "constant", "constant_with_warmup"),
             f"train.scheduler={self.scheduler!r}: use linear, cosine, constant or constant_with_warmup"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmbedkitError(message)
        self.target_modules = tuple(self.target_modules)
        self.packing = str(self.packing).lower()  # YAML's true/false may arrive as a bool
        if self.push_to_hub is not None:  # uploading needs the export: asking for the one asks for both
            from embedkit.train.hub import check_repo_id

            check_repo_id(self.push_to_hub)
            self.export = True

    def fingerprint(self, *parts) -> str:
        """A 12-hex-digit hash of the trained-on settings (all fields but resume, save_every,
        keep_checkpoints, export, max_minutes and push_to_hub) and ``parts`` (JSON-able: other config nodes,
        the seed)."""
        keep = {k: v for k, v in vars(self).items()
                if k not in _NOT_HASHED and not (k in _HASHED_IF_SET and v == _HASHED_IF_SET[k])}
        return hashlib.sha256(json.dumps([keep, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]
