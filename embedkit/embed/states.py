"""Pooled views of one forward pass: the states of any decoder blocks, pooled while the pass runs.

``pooled_views`` runs the base model once and returns, for each requested view (``pooling.view_key``:
a block, with or without the model's final norm), every pooled key of ``pooling.pool_all``. The
blocks' outputs are taken by forward hooks on the decoder blocks (a public ``torch.nn.Module`` API, no
patching of model code) and pooled at once, so a pass never holds more than one block's
[batch, tokens, dim] beyond what the model itself holds; when no requested view needs the last block,
the pass stops after the highest requested block (a layer-k view costs (k+1)/L of a pass).
With ``packed=True`` the pass runs padding-free (``embedkit.embed.packing``): the batch's sequences in one
row, every state put back into the left-padded layout before it is pooled, so the result is the same.
"""

from __future__ import annotations

import contextlib

import torch

from embedkit.embed.packing import pack, packed_attention
from embedkit.embed.pooling import parse_view, pool_all
from embedkit.errors import EmbedkitError

__all__ = ["base_model", "decoder_blocks", "final_norm", "num_blocks", "pooled_views", "text_mask"]


class _Stop(Exception):
    """Raised by the hook of the highest block needed, to end the pass early."""


def base_model(model):
    """The transformers base model under peft / DDP / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), torch.nn.Module):
            model = getattr(model, attr)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's decoder blocks, in order (``model.layers`` for Llama, Qwen, SmolLM2, Mistral, ...)."""
    base = base_model(model)
    n = base.config.num_hidden_layers
    for path in ("layers", "model.layers", "h", "transformer.h", "decoder.layers", "blocks"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return obj
    for _, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise EmbedkitError(f"cannot find the {n} decoder blocks of {type(base).__name__}; pooling.layer needs them "
                        "(use pooling.layer=-1, the last hidden state)")


def final_norm(model) -> torch.nn.Module:
    """The norm the model applies after its last block (``model.norm`` for Llama-style models)."""
    base = base_model(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise EmbedkitError(f"cannot find the final norm of {type(base).__name__}; use pooling.final_norm=auto with "
                        "pooling.layer=-1, or pooling.final_norm=false")


def num_blocks(model) -> int:
    """The number of decoder blocks."""
    return int(base_model(model).config.num_hidden_layers)


def text_mask(spans: list[tuple[int, int]], lengths: list[int], width: int, device) -> torch.Tensor:
    """[B, width] long, 1 on each row's text tokens (``spans`` are [start, end) in the unpadded row;
    rows are left-padded to ``width``)."""
    mask = torch.zeros((len(spans), width), dtype=torch.long)
    for r, ((s, e), n) in enumerate(zip(spans, lengths)):
        mask[r, width - n + s: width - n + e] = 1
    return mask.to(device)


def _forward_kwargs(ids, mask, position_ids: bool) -> dict:
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs["use_cache"] = False
    return kwargs


def pooled_views(model, ids: torch.Tensor, mask: torch.Tensor, views: list[str], tmask: torch.Tensor | None,
                 position_ids: bool = True, packed: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """One forward pass of ``model`` (whatever train/eval and grad mode it is in): ``{view: pool_all(...)}``
    for every view in ``views`` (``pooling.view_key``), float32 [B, D] each. The last block after the
    final norm is the model's own last hidden state; other views are hooked block outputs (normed with
    the model's final norm for ``L<k>n``). ``packed``: a padding-free pass (``embedkit.embed.packing``;
    needs ``position_ids``), same result."""
    n = num_blocks(model)
    wanted = [parse_view(v) for v in views]
    hooked = sorted({layer for layer, normed in wanted if not (layer == n - 1 and normed)})
    needs_last = any(layer == n - 1 and normed for layer, normed in wanted)
    if packed and not position_ids:
        raise EmbedkitError("encode.packing needs a model whose forward takes position_ids; set encode.packing=false")
    row = pack(ids, mask) if packed else None
    unpack = row.unpack if packed else (lambda state: state)  # noqa: E731
    kwargs = row.forward_kwargs() if packed else _forward_kwargs(ids, mask, position_ids)
    attention = packed_attention(base_model(model)) if packed else contextlib.nullcontext()
    if not hooked:  # only transformers' last hidden state
        with attention:
            hidden = model(**kwargs).last_hidden_state
        return {views[0]: pool_all(unpack(hidden), mask, tmask)}

    captured: dict[int, torch.Tensor] = {}
    stop_at = None if needs_last else hooked[-1]
    active = [True]  # off after the pass: activation checkpointing re-runs blocks during backward

    def hook(index):
        def fn(module, args, output):
            if not active[0]:
                return None
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == stop_at:
                raise _Stop
            return None
        return fn

    blocks = decoder_blocks(model)
    handles = [blocks[i].register_forward_hook(hook(i)) for i in hooked]
    last = None
    try:
        with attention:
            last = model(**kwargs).last_hidden_state
    except _Stop:
        pass
    finally:
        active[0] = False
        for h in handles:
            h.remove()
    norm = final_norm(model) if any(normed and layer != n - 1 for layer, normed in wanted) else None
    out = {}
    for key, (layer, normed) in zip(views, wanted):
        if layer == n - 1 and normed:
            state = last
        else:
            state = captured[layer]
            if normed:
                state = norm(state)
        out[key] = pool_all(unpack(state), mask, tmask)
    return out
