"""The encoder: texts -> pooled embeddings, all pooling modes from one forward pass.

Texts are de-duplicated, tokenized once (see ``prompts.tokenize``), sorted by length and grouped into
batches under a token budget, run through the base model (last hidden state only, SDPA, explicit
position ids so left padding changes nothing), pooled in every mode, and restored to input order.
Results are cached on disk per (model, adapter, dtype, prompt, max_length, texts), so the jobs of a
pooling sweep after the first one do no model work.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.embed.models import Backbone
from embedkit.embed.pooling import BASE_MODES, Pooling, pool_all
from embedkit.embed.prompts import Prompt, Tokenized, tokenize

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MEMO_BYTES = 2 * 2**30  # embeddings kept in memory for the next job of a sweep in this process

_MEMO: dict[str, dict[str, np.ndarray]] = {}  # cache key -> embeddings, oldest first


@dataclass
class EncodeConfig:
    """The ``encode`` section of conf/config.yaml, where each key is documented; these are its defaults.

    ``max_length`` cuts each text (before the prompt wraps it); a forward pass holds at most ``batch_size``
    rows and ``max_tokens`` padded tokens; ``cache`` reuses pooled embeddings across runs; ``compile``
    runs the model through ``torch.compile``. ``min`` in a field's metadata is checked by embedkit.schema."""

    max_length: int = field(default=512, metadata={"min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    max_tokens: int = field(default=16384, metadata={"min": 1})
    cache: bool = True
    show_progress: bool = True
    compile: bool = False


def length_batches(lengths: list[int], batch_size: int, max_tokens: int,
                   cost=lambda width, rows: width * rows) -> list[list[int]]:
    """Indices grouped longest first; a batch holds at most ``batch_size`` rows and costs at most
    ``max_tokens`` (by default padded tokens, ``cost(width, rows)``); a single row over budget still
    gets its own batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or cost(width, len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(seqs: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id sequences into ``input_ids`` and ``attention_mask`` [B, max_len]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def takes_position_ids(model) -> bool:
    """Whether the base model's forward accepts ``position_ids`` (and ``use_cache``)."""
    base = getattr(model, "get_base_model", lambda: model)()
    return "position_ids" in inspect.signature(base.forward).parameters


def last_hidden(model, ids: torch.Tensor, mask: torch.Tensor, position_ids: bool = True) -> torch.Tensor:
    """Final-layer states [B, L, D] of the base model; position ids follow the mask, so left padding
    does not shift positions, and no key/value cache is built (nothing is generated)."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs["use_cache"] = False
    return model(**kwargs).last_hidden_state


def _remember(key: str, pooled: dict[str, np.ndarray]) -> None:
    """Keep the newest embeddings in memory (at most MEMO_BYTES in all, oldest dropped first)."""
    size = sum(v.nbytes for v in pooled.values())
    if size > MEMO_BYTES:
        return
    _MEMO[key] = pooled
    while sum(v.nbytes for e in _MEMO.values() for v in e.values()) > MEMO_BYTES:
        _MEMO.pop(next(iter(_MEMO)))


class Encoder:
    """Embeds texts with a backbone and a prompt; ``encode_all`` returns every pooling mode."""

    def __init__(
        self,
        backbone: Backbone,
        prompt: Prompt,
        max_length: int = 512,
        batch_size: int = 32,
        max_tokens: int = 16384,
        cache_dir: str | os.PathLike | None = None,
        show_progress: bool = True,
        compile: bool = False,
    ) -> None:
        self.backbone = backbone
        self.prompt = prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.show_progress = show_progress
        self.forward_calls = 0  # model forward passes run by this encoder (tests and reports read it)
        self.texts_encoded = 0
        self.cache_hits = 0
        self._takes_position_ids = takes_position_ids(backbone.model)
        # torch.compile fuses the small ops between matmuls (norms, rotary, activations); dynamic shapes,
        # since every batch has its own width
        self._model = torch.compile(backbone.model, dynamic=True) if compile else backbone.model

    def cache_key(self, texts: list[str]) -> str:
        """SHA-256 of everything the embeddings of ``texts`` depend on (weights, adapter, dtype, prompt,
        max_length, cache version, the texts in order)."""
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_VERSION, self.backbone.fingerprint, self.prompt.template,
                             self.max_length]).encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()

    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        """The exact token ids of ``texts`` wrapped in this encoder's prompt, each text cut to max_length,
        with the EOS appended (see ``embedkit.embed.prompts.tokenize``)."""
        return tokenize(self.backbone.tokenizer, self.prompt, texts, self.max_length, append_eos=True)

    def encode(self, texts: list[str], pooling: Pooling) -> np.ndarray:
        """Float32 embeddings [len(texts), D] of ``texts`` under one ``pooling``."""
        return pooling.select(self.encode_all(texts))

    def encode_all(self, texts: list[str], desc: str = "encoding") -> dict[str, np.ndarray]:
        """Float32 embeddings [len(texts), D] for every base pooling mode, in input order."""
        texts = list(texts)
        path = None
        if self.cache_dir is not None:
            key = self.cache_key(texts)
            if key in _MEMO:  # the previous job of this sweep (same process) encoded these texts
                self.cache_hits += 1
                log.info("%s: %d texts from the in-memory embedding cache", desc, len(texts))
                _MEMO[key] = _MEMO.pop(key)
                return {m: v.copy() for m, v in _MEMO[key].items()}  # callers may change theirs
            path = self.cache_dir / key[:2] / f"{key}.npz"
            if path.exists():
                with np.load(path) as z:
                    self.cache_hits += 1
                    log.info("%s: %d texts from the embedding cache", desc, len(texts))
                    out = {m: z[m] for m in BASE_MODES}
                _remember(key, out)
                return out
        unique = list(dict.fromkeys(texts))
        pooled = self._encode_unique(unique, desc)
        index = {t: i for i, t in enumerate(unique)}
        rows = np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
        out = {m: v[rows] for m, v in pooled.items()}
        if path is not None:
            with atomic_write(path, "wb") as f:
                np.savez(f, **out)
            _remember(key, out)
        return out

    @torch.inference_mode()
    def _encode_unique(self, texts: list[str], desc: str) -> dict[str, np.ndarray]:
        tok = self.backbone.tokenizer
        items = self.tokenize(texts)
        n_trunc = sum(t.truncated for t in items)
        if n_trunc:
            log.info("%s: %d of %d texts cut to %d tokens", desc, n_trunc, len(items), self.max_length)
        lengths = [len(t.ids) for t in items]
        batches = length_batches(lengths, self.batch_size, self.max_tokens)
        model, device = self._model, self.backbone.device
        dim = self.backbone.model.config.hidden_size
        result = {m: np.empty((len(texts), dim), dtype=np.float32) for m in BASE_MODES}
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not self.show_progress,
                   dynamic_ncols=True)
        pending = list(reversed(batches))
        while pending:
            batch = pending.pop()
            ids, mask = collate([items[i].ids for i in batch], tok.pad_token_id, device)
            try:
                hidden = last_hidden(model, ids, mask, self._takes_position_ids)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise EmbedkitError(
                        f"{desc}: out of GPU memory on a single text of {ids.shape[1]} tokens; lower "
                        "encode.max_length or use a smaller model.dtype") from None
                del ids, mask
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                log.warning("%s: out of GPU memory on a batch of %d texts x %d tokens; retrying as two "
                            "batches of %d and %d (lower encode.max_tokens to avoid this)", desc, len(batch),
                            len(items[batch[0]].ids), half, len(batch) - half)
                pending += [batch[half:], batch[:half]]
                continue
            self.forward_calls += 1
            for mode, vec in pool_all(hidden, mask).items():
                result[mode][batch] = vec.cpu().numpy()
            bar.update(len(batch))
        bar.close()
        self.texts_encoded += len(texts)
        return result
