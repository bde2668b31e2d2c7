"""The model that trains: a peft LoRA adapter on a copy of the backbone, its autocast dtype, and the
pooled embeddings of token sequences through it (the prompt and pooling of evaluation).

The loaded backbone itself is never modified, so other jobs of a sweep can reuse it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re

import torch

from embedkit.embed.encoder import collate
from embedkit.embed.models import Backbone, cpu_supports_bf16
from embedkit.embed.pooling import Pooling
from embedkit.embed.states import decoder_blocks, num_blocks, pooled_views, text_mask
from embedkit.errors import EmbedkitError
from embedkit.train.config import TrainConfig

log = logging.getLogger(__name__)


def make_lora_model(backbone: Backbone, cfg: TrainConfig, pooling: Pooling | None = None):
    """A peft model: a deep copy of ``backbone.model`` with a LoRA adapter on ``cfg.target_modules`` (of the
    blocks up to the highest one ``pooling`` reads),
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
    if cfg.model_dropout and backbone.device.type == "cpu":
        log.info("train.model_dropout=%g: attention dropout makes torch's CPU attention use its math kernel, which "
                 "keeps every [heads x tokens x tokens] weight for the backward (make bench, section step: 1.7x "
                 "the memory of a step without it); train.model_dropout=0 keeps the fused kernel when the pairs "
                 "differ already (crops, pairs, paraphrases)", cfg.model_dropout)
    if cfg.model_dropout:
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = cfg.model_dropout
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lora_targets(model, cfg.target_modules, pooling), bias="none")
    if getattr(model, "is_quantized", False):  # QLoRA: norms in fp32, inputs require grad
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def lora_targets(model, names, pooling: Pooling | None) -> list[str] | str:
    """peft's ``target_modules``: the module ``names``, or, when ``pooling`` reads a block below the last, a
    regular expression for those modules in blocks 0..k only (blocks above k cannot change the embedding)."""
    n = num_blocks(model)
    top = max(pooling.resolve_layers(n)) if pooling is not None else n - 1
    if top == n - 1:
        return list(names)
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    log.info("pooling reads block %d: LoRA goes on blocks 0-%d only (the %d blocks above cannot change the "
             "embedding)", top, top, n - 1 - top)
    return (rf"^{re.escape(prefix)}\.({'|'.join(map(str, range(top + 1)))})\..*"
            rf"\.({'|'.join(map(re.escape, names))})$")


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
                    dtype: torch.dtype | None, position_ids: bool,
                    spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """[len(seqs), D] float32: the pooled embeddings of the token sequences ``seqs``, in their order,
    under autocast ``dtype`` (``None``: fp32), with whatever train/eval mode ``model`` is in. The pooled
    states are those evaluation pools (``pooling.layer``, ``final_norm``, and ``span`` over the texts'
    ``spans``, needed for ``span=text``).

    On CPU, sequences of very different lengths (short titles and long bodies) run as separate passes, so
    short ones are not padded to the longest; the split depends on lengths only, so a GradCache replay
    draws the same dropout masks. On a GPU, passes of a few thousand tokens are bound by kernel launches,
    not arithmetic: one pass."""
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    n_layers = num_blocks(model)
    views = pooling.views(n_layers)
    if pooling.span == "text" and spans is None:
        raise EmbedkitError("pooling.span=text needs the texts' token spans")
    reps, order = [], []
    groups = width_groups([len(s) for s in seqs]) if device.type == "cpu" else [list(range(len(seqs)))]
    for group in groups:
        ids, mask = collate([seqs[i] for i in group], pad_id, device)
        tmask = text_mask([spans[i] for i in group], [len(seqs[i]) for i in group], ids.shape[1], device) \
            if pooling.span == "text" else None
        with ctx:
            pooled = pooled_views(model, ids, mask, views, tmask, position_ids)
        reps.append(pooling.select(pooled, n_layers).float())
        order += group
    out = torch.cat(reps)
    if order != sorted(order):
        out = out[torch.argsort(torch.tensor(order, device=out.device))]
    return out
