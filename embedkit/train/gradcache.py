"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
a contrastive loss over a batch larger than one forward pass, with the gradients of one big pass.

It reads like sentence-transformers' ``CachedMultipleNegativesRankingLoss``:

1. embed every chunk without an autograd graph, capturing the random state before each chunk
   (``RandContext``), so only the embeddings are kept;
2. compute the loss over the whole batch from those embeddings and back-propagate it to the embeddings
   only: their gradients are the cache;
3. re-embed each chunk with a graph under its captured random state (the same dropout masks) and
   back-propagate the surrogate ``sum(embedding * cached gradient)``, whose gradient w.r.t. the
   parameters is the chunk's share of the full-batch gradient.

Memory is that of one chunk plus the batch's embeddings, for about 1.3-1.5x the compute of one pass.
The loss of step 2 may all-gather across ranks (``embedkit.train.distributed``): each rank caches and
replays only its own chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# the embeddings of some pairs: (anchors, positives, hard negatives or None), row i of each for pair i
Embeddings = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(CPU generator state, CUDA generator state of device or None)``: what decides dropout masks;
    checkpoints store it in this form."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class RandContext:
    """The random state at construction, replayed by ``with ctx:``: inside, the CPU (and ``device``'s
    CUDA) generators start from the captured state; on exit they are what they were before the block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state, self.cuda_state = rng_state(device)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        del self._fork


class GradCache:
    """One GradCache backward pass over a batch split into chunks.

    Takes ``embed`` (pair indices -> their ``Embeddings``, in training mode), ``loss`` (the ``Embeddings``
    of the whole batch, concatenated in chunk order -> scalar loss; it may all-gather across ranks),
    ``backward`` (runs ``.backward()`` on a surrogate, e.g. through a ``GradScaler``) and the device
    whose random state dropout draws from. ``__call__(chunks, **loss_kwargs)`` (``chunks``: lists of pair
    indices; ``loss_kwargs`` go to ``loss``) leaves the parameter gradients in ``.grad`` and returns the
    loss.
    """

    def __init__(self, embed: Callable[[list[int]], Embeddings], loss: Callable[..., torch.Tensor],
                 backward: Callable[[torch.Tensor], None], device: torch.device) -> None:
        self.embed, self.loss, self.backward, self.device = embed, loss, backward, device

    def __call__(self, chunks: Sequence[list[int]], **loss_kwargs) -> float:
        reps, states = self.embed_without_graph(chunks)             # 1) embeddings only
        loss, cached = self.cache_gradients(reps, **loss_kwargs)    # 2) loss, gradients at the embeddings
        self.replay(chunks, states, cached)                         # 3) chunk by chunk through the model
        return float(loss.detach())

    def embed_without_graph(self, chunks: Sequence[list[int]]) -> tuple[list[Embeddings], list[RandContext]]:
        """Step 1: the embeddings of every chunk, computed under ``no_grad``, and the random state each
        chunk was embedded from."""
        reps, states = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RandContext(self.device))
                reps.append(self.embed(chunk))
        return reps, states

    def cache_gradients(self, reps: list[Embeddings], **loss_kwargs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Step 2: the loss over the whole batch (``loss(anchors, positives, negatives, **loss_kwargs)``) and
        its gradient w.r.t. each kind of embedding (anchors, positives, negatives or ``None``), rows in
        chunk order."""
        whole = [torch.cat([r[k] for r in reps]).requires_grad_() if reps[0][k] is not None else None
                 for k in range(3)]
        loss = self.loss(*whole, **loss_kwargs)
        loss.backward()  # unscaled: these gradients stop at the embeddings
        return loss, [None if x is None else x.grad for x in whole]

    def replay(self, chunks: Sequence[list[int]], states: list[RandContext], cached: list[torch.Tensor | None]) -> None:
        """Step 3: re-embed each chunk with a graph from its captured random state and back-propagate its
        rows of the cached gradients into the parameters."""
        start = 0
        for chunk, state in zip(chunks, states):
            rows = slice(start, start + len(chunk))
            with state:
                again = self.embed(chunk)
            surrogate = (again[0] * cached[0][rows]).sum() + (again[1] * cached[1][rows]).sum()
            if again[2] is not None:
                surrogate = surrogate + (again[2] * cached[2][rows]).sum()
            self.backward(surrogate)
            start += len(chunk)
