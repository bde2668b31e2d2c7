"""InfoNCE with in-batch negatives, the contrastive loss of the paper (and of SimCSE, E5, GTE, ...).

Inputs: anchors ``a`` [N, D] and positives ``p`` [N, D] (row i of ``p`` is the positive of row i of ``a``),
optional hard negatives ``n`` [M, D]. With cosine similarities s(x, y) and temperature t:

    loss = mean_i -log( e_ii / (e_ii + sum_{j != i} exp(s(a_i, c_j) / t)) ),  e_ii = exp((s(a_i, p_i) - m) / t)

where the candidates c are all positives of the batch (plus the hard negatives) and m is an optional
additive margin on the positive (AM-Softmax style; 0 in the paper). ``symmetric`` averages this with the
same loss from positives to anchors (the paper uses one direction). ``exclude`` [N, N] marks off-diagonal
pairs that must not count as negatives (e.g. identical texts in one batch: false negatives).

Relation to the other pieces: GradCache (``embedkit.train.gradcache``) calls this on embeddings computed without a
graph and back-propagates its gradient chunk by chunk, so the loss sees all N-way negatives; plain
gradient accumulation calls it per micro-batch (the paper's 12-way setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    a: torch.Tensor,
    p: torch.Tensor,
    temperature: float = 0.2,
    negatives: torch.Tensor | None = None,
    symmetric: bool = False,
    margin: float = 0.0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The InfoNCE loss (a scalar tensor, mean over the N anchors) of anchors ``a`` [N, D] against the
    positives ``p`` [N, D] and the optional hard ``negatives`` [M, D], as in the module doc; ``exclude``
    [N, N] bool marks candidates p_j that are not negatives of a_i (its diagonal is ignored)."""
    a, p = F.normalize(a.float(), dim=-1), F.normalize(p.float(), dim=-1)
    candidates = p if negatives is None else torch.cat([p, F.normalize(negatives.float(), dim=-1)])
    sim = a @ candidates.T  # [N, N (+M)]
    n = a.shape[0]
    eye = torch.eye(n, sim.shape[1], dtype=torch.bool, device=sim.device)
    sim = sim - margin * eye
    if exclude is not None:
        mask = torch.zeros_like(eye)
        mask[:, :n] = exclude & ~eye[:, :n]
        sim = sim.masked_fill(mask, float("-inf"))
    target = torch.arange(n, device=sim.device)
    loss = F.cross_entropy(sim / temperature, target)
    if symmetric:
        back = (p @ a.T) - margin * torch.eye(n, dtype=sim.dtype, device=sim.device)
        if exclude is not None:
            back = back.masked_fill(exclude.T & ~torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))
        loss = (loss + F.cross_entropy(back / temperature, target)) / 2
    return loss
