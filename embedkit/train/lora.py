"""The model that trains: a peft LoRA adapter on a copy of the backbone, its autocast dtype, and the
pooled embeddings of token sequences through it (the prompt and pooling of evaluation).

The loaded backbone itself is never modified, so other jobs of a sweep can reuse it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
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
                      target_modules=lora_targets(model, cfg.target_modules, pooling, cfg.lora_depth),
                      bias="none")
    if getattr(model, "is_quantized", False):  # QLoRA: norms in fp32, inputs require grad
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = get_peft_model(model, lora)
    if cfg.lora_depth < 1:
        _, low, top = block_range(model, pooling, cfg.lora_depth)
        log.info("train.lora_depth=%g: LoRA on blocks %d-%d; the %d blocks below stay frozen and the backward "
                 "stops above them", cfg.lora_depth, low, top, low)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def block_range(model, pooling: Pooling | None, depth: float = 1.0) -> tuple[int, int, int]:
    """(number of blocks, lowest, highest block that get LoRA): the highest is the top block ``pooling``
    reads (blocks above it cannot change the embedding), the lowest leaves ``depth`` of blocks 0..top
    (rounded up, at least one) adapted."""
    n = num_blocks(model)
    top = max(pooling.resolve_layers(n)) if pooling is not None else n - 1
    low = top + 1 - max(1, math.ceil(depth * (top + 1) - 1e-9))
    return n, low, top


def lora_targets(model, names, pooling: Pooling | None, depth: float = 1.0) -> list[str] | str:
    """peft's ``target_modules``: the module ``names``, or, when only some blocks get LoRA (``pooling``
    reads a block below the last, or ``depth`` < 1: ``block_range``), a regular expression for those
    modules in those blocks only."""
    n, low, top = block_range(model, pooling, depth)
    if (low, top) == (0, n - 1):
        return list(names)
    if top < n - 1:
        log.info("pooling reads block %d: LoRA goes on blocks up to %d only (the %d blocks above cannot change "
                 "the embedding)", top, top, n - 1 - top)
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return (rf"^{re.escape(prefix)}\.({'|'.join(map(str, range(low, top + 1)))})\..*"
            rf"\.({'|'.join(map(re.escape, names))})$")


#: The most memory the math attention kernel may keep for the backward of one training pass (``attention_kernel``).
MATH_ATTENTION_BYTES = 1 << 30


def attention_kernel(choice: str, device: torch.device, model, lengths: list[int],
                     packed: bool = False) -> contextlib.AbstractContextManager:
    """The attention kernel of one training pass over sequences of ``lengths`` (padded to the longest, or
    ``packed``: each attends over itself only) as a context manager.

    torch's fused (flash) attention for CPU has a slow backward at the short widths contrastive training
    uses: a recipe step (32 pairs x 64 tokens) is ~14% faster with the math kernel, which keeps the
    [B, heads, T, T] attention weights (and their pre-softmax scores) of every block for the backward
    instead. ``auto`` takes the math kernel on CPU while grad is on, activation checkpointing is off (its
    recomputation would run the other kernel) and those weights fit ``MATH_ATTENTION_BYTES``; ``math`` and
    ``fused`` force a kernel (CPU only; CUDA keeps torch's choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cpu" or choice == "fused" or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    if choice == "auto":
        if getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)):
            return contextlib.nullcontext()
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        if heads is None:
            return contextlib.nullcontext()
        squares = sum(n * n for n in lengths) if packed else len(lengths) * max(lengths) ** 2
        kept = 2 * 4 * num_blocks(model) * heads * squares  # scores + weights, fp32 worst case
        if kept > MATH_ATTENTION_BYTES:
            return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; ``None`` means fp32 (no autocast)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_packing(policy: str, device: torch.device, position_ids: bool) -> bool:
    """Whether training passes are packed under ``train.packing``: ``auto`` on the CPU (where the model takes
    position ids), ``true`` anywhere (an error for a model without position ids), ``false`` never."""
    if policy == "true" and not position_ids:
        raise EmbedkitError("train.packing=true needs a model whose forward takes position_ids; set "
                            "train.packing=false")
    return policy == "true" or (policy == "auto" and device.type == "cpu" and position_ids)


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
                    spans: list[tuple[int, int]] | None = None, attention: str = "auto",
                    packed: bool = False) -> torch.Tensor:
    """[len(seqs), D] float32: the pooled embeddings of the token sequences ``seqs``, in their order,
    under autocast ``dtype`` (``None``: fp32), with whatever train/eval mode ``model`` is in. The pooled
    states are those evaluation pools (``pooling.layer``, ``final_norm``, and ``span`` over the texts'
    ``spans``, needed for ``span=text``); ``attention``: the kernel choice of ``attention_kernel``;
    ``packed``: all sequences in one padding-free pass (``embedkit.embed.packing``; needs ``position_ids``).

    Padded, on CPU, sequences of very different lengths (short titles and long bodies) run as separate passes, so
    short ones are not padded to the longest; the split depends on lengths only, so a GradCache replay
    draws the same dropout masks. On a GPU, passes of a few thousand tokens are bound by kernel launches,
    not arithmetic: one pass."""
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    n_layers = num_blocks(model)
    views = pooling.views(n_layers)
    if pooling.span == "text" and spans is None:
        raise EmbedkitError("pooling.span=text needs the texts' token spans")
    reps, order = [], []
    groups = width_groups([len(s) for s in seqs]) if device.type == "cpu" and not packed \
        else [list(range(len(seqs)))]
    for group in groups:
        ids, mask = collate([seqs[i] for i in group], pad_id, device)
        tmask = text_mask([spans[i] for i in group], [len(seqs[i]) for i in group], ids.shape[1], device) \
            if pooling.span == "text" else None
        with ctx, attention_kernel(attention, device, model, [len(seqs[i]) for i in group], packed):
            pooled = pooled_views(model, ids, mask, views, tmask, position_ids, packed=packed)
        reps.append(pooling.select(pooled, n_layers).float())
        order += group
    out = torch.cat(reps)
    if order != sorted(order):
        out = out[torch.argsort(torch.tensor(order, device=out.device))]
    return out
