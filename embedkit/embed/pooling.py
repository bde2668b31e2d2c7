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

Inputs are left-padded: the last column is the EOS of every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embedkit.errors import EmbedkitError

BASE_MODES = ("mean", "last", "eos", "weighted_mean")
MODES = (*BASE_MODES, "concat")


def pool_all(hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """All base poolings of a left-padded batch whose rows end with EOS. Returns float32 [B, D]."""
    h = hidden.float()
    content = attention_mask.to(h.dtype).clone()
    content[:, -1] = 0  # the appended EOS
    weights = content.cumsum(dim=1) * content
    return {
        "mean": (h * content.unsqueeze(-1)).sum(1) / content.sum(1, keepdim=True).clamp(min=1),
        "last": h[:, -2],
        "eos": h[:, -1],
        "weighted_mean": (h * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1),
    }


def _unit(x):
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, dim=1)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


@dataclass(frozen=True)
class Pooling:
    """One pooling option (``conf/pooling``): ``mode`` is one of ``MODES``; ``normalize`` makes the vectors
    unit length."""
    name: str
    mode: str
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EmbedkitError(
                f"pooling '{self.name}': unknown mode '{self.mode}'; choose one of {', '.join(MODES)}"
            )

    def select(self, pooled: dict):
        """Pick (or build) this pooling's vectors from the output of ``pool_all`` (numpy or torch)."""
        if self.mode == "concat":
            parts = [_unit(pooled["mean"]), _unit(pooled["last"])]
            cat = torch.cat if isinstance(parts[0], torch.Tensor) else np.concatenate
            out = cat(parts, 1)
        else:
            out = pooled[self.mode]
        return _unit(out) if self.normalize else out
