"""InfoNCE with in-batch negatives, the contrastive loss of the paper (and of SimCSE, E5, GTE, ...).

Inputs: anchors ``a`` [N, D] and positives ``p`` [N, D] (row i of ``p`` is the positive of row i of ``a``),
optional hard negatives ``n`` [M, D]. With cosine similarities s(x, y) and temperature t:

    loss = mean_i -log( e_ii / (e_ii + sum_{j != i} exp(s(a_i, c_j) / t)) ),  e_ii = exp((s(a_i, p_i) - m) / t)

where the candidates c are all positives of the batch (plus the hard negatives) and m is an optional
additive margin on the positive (AM-Softmax style; 0 in the paper). ``symmetric`` averages this with the
same loss from positives to anchors (the paper uses one direction). ``exclude`` [N, N] marks off-diagonal
pairs that must not count as negatives (e.g. identical texts in one batch: false negatives).

``partition="gte"`` is the "improved contrastive loss" of GTE (Li et al. 2023, arXiv 2308.03281; in
sentence-transformers ``MultipleNegativesRankingLoss(directions=(all four), partition_mode="joint")``): one
softmax per anchor whose denominator also holds the other anchors (a_i -> a_j), every anchor against the
positive (a_j -> p_i, the positive itself included) and the other positives (p_i -> p_j), so a batch of N
pairs gives about 4N candidates from the same N encodings, at no extra forward pass:

    Z_i = sum_j e(a_i, c_j) + sum_{j != i} e(a_i, a_j) + sum_j e(a_j, p_i) + sum_{j != i} e(p_i, p_j)

(the margin applies to both copies of the positive; ``exclude`` drops a_j -> p_i where ``exclude[j, i]``,
and the same-type terms where either of ``exclude[i, j]``, ``exclude[j, i]`` is set). It already contains the
positives -> anchors direction, so ``symmetric`` does not combine with it.

``hardness`` (alpha, default 0) is the hardness weighting of LLaVE (Lan et al. 2025, arXiv 2503.04812; in
sentence-transformers ``hardness_strength``): each negative a_i -> c_j is weighted by exp(alpha * s(a_i, c_j))
with the similarity held constant (no gradient through the weight), i.e. alpha * sg(s) is added to its logit
after the temperature, so near negatives count more; it applies to the anchors -> candidates term only.

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
    partition: str = "positives",
    hardness: float = 0.0,
) -> torch.Tensor:
    """The InfoNCE loss (a scalar tensor, mean over the N anchors) of anchors ``a`` [N, D] against the
    positives ``p`` [N, D] and the optional hard ``negatives`` [M, D], as in the module doc; ``exclude``
    [N, N] bool marks candidates p_j that are not negatives of a_i (its diagonal is ignored); ``partition``
    is ``positives`` (the candidates are the positives and hard negatives) or ``gte``; ``hardness`` weights
    the near negatives more (both in the module doc)."""
    if partition not in ("positives", "gte"):
        raise ValueError(f"partition={partition!r}: use 'positives' or 'gte'")
    if partition == "gte" and symmetric:
        raise ValueError("partition='gte' already holds the positives -> anchors direction: use symmetric=False")
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
    forward = sim / temperature
    if hardness:
        forward = forward + hardness * sim.detach().masked_fill(eye, 0.0)
    if partition == "gte":
        diag = eye[:, :n]
        marks = torch.zeros_like(diag) if exclude is None else exclude & ~diag
        same_type = diag | marks | marks.T  # a_i with itself and its false negatives
        blocks = [(a @ a.T).masked_fill(same_type, float("-inf")),
                  ((p @ a.T) - margin * diag).masked_fill(marks.T, float("-inf")),  # row i: a_j -> p_i
                  (p @ p.T).masked_fill(same_type, float("-inf"))]
        logits = torch.cat([forward, torch.cat(blocks, dim=1) / temperature], dim=1)
        return (torch.logsumexp(logits, dim=1) - forward.diagonal()).mean()
    target = torch.arange(n, device=sim.device)
    loss = F.cross_entropy(forward, target)
    if symmetric:
        back = (p @ a.T) - margin * torch.eye(n, dtype=sim.dtype, device=sim.device)
        if exclude is not None:
            back = back.masked_fill(exclude.T & ~torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))
        loss = (loss + F.cross_entropy(back / temperature, target)) / 2
    return loss
