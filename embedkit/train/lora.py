"""The model that trains: a peft LoRA adapter on a copy of the backbone, its autocast dtype, and the
pooled embeddings of token sequences through it (the prompt and pooling of evaluation).

The loaded backbone itself is never modified, so other jobs of a sweep can reuse it.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from embedkit.embed.encoder import collate, last_hidden
from embedkit.embed.models import Backbone, cpu_supports_bf16
from embedkit.embed.pooling import Pooling, pool_all
from embedkit.errors import EmbedkitError
from embedkit.train.config import TrainConfig


def make_lora_model(backbone: Backbone, cfg: TrainConfig):
    """A peft model: a deep copy of ``backbone.model`` with a LoRA adapter on ``cfg.target_modules``,
    attention dropout ``cfg.model_dropout``, and activation checkpointing if asked. Raises
    ``EmbedkitError`` for target modules the model lacks or a model dropout it cannot apply."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise EmbedkitError(f"train.target_modules: {missing} not found in {backbone.name}; "
                            f"its linear layers are named {linear}")
    if cfg.model_dropout and not any(hasattr(m, "attention_dropout") for m in backbone.model.modules()):
        raise EmbedkitError(f"train.model_dropout={cfg.model_dropout} has no effect on {backbone.name}: its "
                            "attention modules have no attention_dropout; set train.model_dropout=0 (and make "
                            "positives with an augmentation if anchors equal positives)")
    model = copy.deepcopy(backbone.model)  # the loaded backbone stays untouched for other jobs
    if cfg.model_dropout:
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = cfg.model_dropout
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")
    if getattr(model, "is_quantized", False):  # QLoRA: norms in fp32, inputs require grad
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; ``None`` means fp32 (no autocast)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def width_groups(lengths: list[int], ratio: float = 0.5) -> list[list[int]]:
    """Indices grouped longest first; a new group starts where a sequence is at most ``ratio`` times the
    group's longest (it would be more than half padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if not groups or lengths[i] <= ratio * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


def embed_sequences(model, seqs: list[tuple[int, ...]], pooling: Pooling, pad_id: int, device: torch.device,
                    dtype: torch.dtype | None, position_ids: bool) -> torch.Tensor:
    """[len(seqs), D] float32: the pooled embeddings of the token sequences ``seqs``, in their order,
    under autocast ``dtype`` (``None``: fp32), with whatever train/eval mode ``model`` is in.

    On CPU, sequences of very different lengths (short titles and long bodies) run as separate passes, so
    short ones are not padded to the longest; the split depends on lengths only, so a GradCache replay
    draws the same dropout masks. On a GPU, passes of a few thousand tokens are bound by kernel launches,
    not arithmetic: one pass."""
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    reps, order = [], []
    groups = width_groups([len(s) for s in seqs]) if device.type == "cpu" else [list(range(len(seqs)))]
    for group in groups:
        ids, mask = collate([seqs[i] for i in group], pad_id, device)
        with ctx:
            hidden = last_hidden(model, ids, mask, position_ids)
        reps.append(pooling.select(pool_all(hidden, mask)).float())
        order += group
    out = torch.cat(reps)
    if order != sorted(order):
        out = out[torch.argsort(torch.tensor(order, device=out.device))]
    return out
