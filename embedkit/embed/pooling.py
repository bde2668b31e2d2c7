"""Pooling: from token states to one vector per text.

Every sequence the encoder builds ends with an appended EOS token, and the model is causal, so the
states of all earlier tokens are exactly those of the sequence without EOS. One forward pass therefore
serves every mode (``pool_all``), and a sweep over poolings costs one encode:

- ``mean``: average over all real tokens (special prefix and prompt included, EOS and padding excluded),
  as in the paper's code;
- ``last``: the last real token before EOS (for a prompt, its final word);
- ``eos``: the appended EOS token;
- ``weighted_mean``: position-weighted mean, weight i for the i-th real token (SGPT);
- ``concat``: ``[mean / |mean|, last / |last|]`` (the parts are normalised so neither dominates).

Three levers choose *which* states are pooled (all served by the same forward pass):

- ``layer``: the decoder block whose output is pooled (0-based; ``-1`` the last, negative counts from the
  end), or a list of blocks whose pooled vectors are averaged ("Layer by Layer", Skean et al. 2025);
- ``final_norm``: transformers' last hidden state is the last block's output *after* the model's final
  norm, the other blocks' outputs are not normed. ``auto`` keeps that convention, ``true`` applies the final
  norm to every pooled layer, ``false`` to none (the last block's raw output);
- ``span``: ``all`` pools prompt and text (the paper's code), ``text`` only the text's own tokens
  (llm2vec's ``skip_instruction``, sentence-transformers' ``include_prompt=False``); it changes ``mean``,
  ``weighted_mean`` and the mean half of ``concat`` (weights 1..n over the text's tokens).

The pooled vectors of one forward pass are keyed by *view*, ``view_key(layer, normed)``, then by
``mode_key(mode, span)``. Inputs are left-padded: the last column is the EOS of every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embedkit.errors import EmbedkitError

BASE_MODES = ("mean", "last", "eos", "weighted_mean")
MODES = (*BASE_MODES, "concat")
SPANS = ("all", "text")
SPAN_MODES = ("mean", "weighted_mean")  # the modes that ``span`` changes
POOLED_KEYS = (*BASE_MODES, *(f"{m}@text" for m in SPAN_MODES))  # what one view holds


def mode_key(mode: str, span: str) -> str:
    """The key of ``mode`` pooled over ``span`` in a view (``mean@text``; ``last`` for any span)."""
    return f"{mode}@text" if span == "text" and mode in SPAN_MODES else mode


def view_key(layer: int, normed: bool) -> str:
    """The name of one pooled view: ``L12`` (block 12's raw output) or ``L29n`` (after the final norm)."""
    return f"L{layer}{'n' if normed else ''}"


def default_view(n_layers: int) -> str:
    """The view of the default pooling: the last block after the final norm (transformers' last hidden
    state)."""
    return view_key(n_layers - 1, True)


def parse_view(key: str) -> tuple[int, bool]:
    """``(layer, normed)`` of a ``view_key``."""
    return int(key[1:].rstrip("n")), key.endswith("n")


def pool_all(hidden: torch.Tensor, attention_mask: torch.Tensor,
             text_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All base poolings of a left-padded batch whose rows end with EOS. Returns float32 [B, D] per key;
    with ``text_mask`` ([B, L], 1 on each text's own tokens) also ``mean@text`` and ``weighted_mean@text``."""
    h = hidden.float()
    content = attention_mask.to(h.dtype).clone()
    content[:, -1] = 0  # the appended EOS
    out = {"last": h[:, -2], "eos": h[:, -1]}
    spans = [("", content)] + ([("@text", text_mask.to(h.dtype))] if text_mask is not None else [])
    for suffix, m in spans:
        weights = m.cumsum(dim=1) * m
        out["mean" + suffix] = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        out["weighted_mean" + suffix] = (h * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return out


def _unit(x):
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, dim=1)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _layers(value) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple, range)) or hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    if not values:
        raise EmbedkitError("pooling.layer is empty; give a block index (pooling.layer=-1 is the last block), a "
                            "list (pooling.layer=[-4,-3,-2,-1]) or sweep one (embedkit -m pooling.layer=range(0,30))")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise EmbedkitError(f"pooling.layer={value!r}: expected block indices (integers), e.g. pooling.layer=-1 "
                                "or pooling.layer=[-4,-3,-2,-1]")
    return tuple(values)


@dataclass(frozen=True)
class Pooling:
    """One pooling option (``conf/pooling``): ``mode`` is one of ``MODES``; ``normalize`` makes the vectors
    unit length; ``layer``, ``final_norm`` and ``span`` choose the pooled states (see the module doc)."""
    name: str
    mode: str
    normalize: bool = False
    layer: int | list = -1
    span: str = "all"
    final_norm: bool | str = "auto"
    layers: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EmbedkitError(
                f"pooling '{self.name}': unknown mode '{self.mode}'; choose one of {', '.join(MODES)}"
            )
        if self.span not in SPANS:
            raise EmbedkitError(f"pooling.span={self.span!r}; choose one of {', '.join(SPANS)}")
        if self.final_norm not in ("auto", True, False):
            raise EmbedkitError(f"pooling.final_norm={self.final_norm!r}; choose auto (transformers' convention: "
                                "only the last block is normed), true (every pooled block) or false (none)")
        object.__setattr__(self, "layers", _layers(self.layer))

    @property
    def is_default_view(self) -> bool:
        """Whether this pooling reads transformers' last hidden state (the paper's setting)."""
        return self.layers == (-1,) and self.final_norm in ("auto", True)

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The block indices (0 .. n_layers-1) this pooling averages; raises for an index out of range."""
        bad = [i for i in self.layers if not -n_layers <= i < n_layers]
        if bad:
            raise EmbedkitError(f"pooling.layer={list(self.layers) if len(self.layers) > 1 else self.layers[0]}: "
                                f"the model has {n_layers} blocks, so a layer is in {-n_layers}..{n_layers - 1} "
                                "(-1 is the last)")
        return tuple(i % n_layers for i in self.layers)

    def views(self, n_layers: int) -> list[str]:
        """The view keys this pooling reads (one per layer, in order)."""
        norm = lambda i: self.final_norm is True or (self.final_norm == "auto" and i == n_layers - 1)  # noqa: E731
        return list(dict.fromkeys(view_key(i, norm(i)) for i in self.resolve_layers(n_layers)))

    def describe(self) -> dict:
        """What results.json records about this pooling (every field that changes the vectors)."""
        return {"mode": self.mode, "normalize": self.normalize,
                "layer": self.layers[0] if len(self.layers) == 1 else list(self.layers),
                "span": self.span, "final_norm": self.final_norm}

    def select(self, pooled: dict, n_layers: int | None = None):
        """This pooling's vectors (numpy or torch) from pooled states: either one view's dict as
        ``pool_all`` returns it (the default view), or ``{view_key: that dict}`` for the views of
        ``self.views(n_layers)``, whose vectors are averaged over the layers."""
        if "last" in pooled:  # one view's dict
            if not self.is_default_view:
                raise EmbedkitError(f"pooling '{self.name}' reads blocks {list(self.layers)} (final_norm="
                                    f"{self.final_norm}): select it from views, not from the last hidden state")
            return self._finish(self._one(pooled))
        views = self.views(n_layers)
        vecs = [self._one(pooled[v]) for v in views]
        return self._finish(vecs[0] if len(vecs) == 1 else sum(vecs[1:], vecs[0]) / len(vecs))

    def _one(self, view: dict):
        if self.mode == "concat":
            parts = [_unit(view[mode_key("mean", self.span)]), _unit(view["last"])]
            cat = torch.cat if isinstance(parts[0], torch.Tensor) else np.concatenate
            return cat(parts, 1)
        return view[mode_key(self.mode, self.span)]

    def _finish(self, out):
        return _unit(out) if self.normalize else out
