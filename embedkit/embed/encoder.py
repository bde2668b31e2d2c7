"""The encoder: texts -> pooled embeddings, all pooling modes from one forward pass.

Texts are de-duplicated, tokenized once (see ``prompts.tokenize``), sorted by length and grouped into
batches under a token budget, run through the base model (last hidden state only, SDPA, explicit
position ids so left padding changes nothing; with ``encode.packing`` a batch runs padding-free as one
packed row, see ``embedkit.embed.packing``), pooled in every mode, and restored to input order.
Results are cached on disk per (model, adapter, dtype, prompt, max_length, texts), so the jobs of a
pooling sweep after the first one do no model work. Cache files are written by one background thread
(``flush_cache_writes`` waits for them; a read from disk and the interpreter's exit wait too), so the
write of a pass's views overlaps the evaluation instead of delaying it; each file is still atomic.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.embed.models import Backbone
from embedkit.embed.packing import PACKING_POLICIES, check_packing, resolve_packing
from embedkit.embed.pooling import POOLED_KEYS, Pooling, default_view, parse_view, view_key
from embedkit.embed.prompts import Prompt, PromptEnsemble, Tokenized, tokenize
from embedkit.embed.states import num_blocks, pooled_views, text_mask

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MEMO_BYTES = 2 * 2**30  # embeddings kept in memory for the next job of a sweep in this process

_MEMO: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # cache key -> view -> embeddings, oldest first
_WRITER: list[ThreadPoolExecutor] = []  # the one background writer of cache files, made on first use
_PENDING: list[Future] = []             # its writes not yet waited for
LAYER_POLICIES = ("auto", "requested", "all")


@dataclass
class EncodeConfig:
    """The ``encode`` section of conf/config.yaml, where each key is documented; these are its defaults.

    ``max_length`` cuts each text (before the prompt wraps it); a forward pass holds at most ``batch_size``
    rows and ``max_tokens`` padded tokens; ``cache`` reuses pooled embeddings across runs; ``compile``
    runs the model through ``torch.compile``; ``layers`` says which blocks a pass pools (``auto``: every
    block once a pooling asks for one other than the last hidden state, ``requested``, ``all``); ``packing``
    runs padding-free passes (``auto``, ``true``, ``false``; see ``embedkit.embed.packing``). ``min`` and
    ``choices`` in a field's metadata are checked by embedkit.schema."""

    max_length: int = field(default=512, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    max_tokens: int = field(default=4096, metadata={"min": 1})
    cache: bool = True
    show_progress: bool = True
    compile: bool = False
    layers: str = "auto"
    packing: str = field(default="auto", metadata={"choices": PACKING_POLICIES})


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


def flush_cache_writes() -> None:
    """Wait until every embedding-cache file queued by this process is on disk; re-raises the first error
    of those writes (e.g. a full disk)."""
    pending = list(_PENDING)
    del _PENDING[:len(pending)]
    errors = [e for e in (f.exception() for f in pending) if e is not None]
    if errors:
        raise errors[0]


def _write_later(cache_dir: Path, key: str, view: str, arrays: dict[str, np.ndarray], n_layers: int) -> None:
    """Queue ``_write_view`` on the background writer (the arrays are not changed after this)."""
    if not _WRITER:
        _WRITER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-cache"))
        atexit.register(flush_cache_writes)
    _PENDING.append(_WRITER[0].submit(_write_view, cache_dir, key, view, arrays, n_layers))


def _nbytes(views: dict) -> int:
    return sum(a.nbytes for arrays in views.values() for a in arrays.values())


def _remember(key: str, views: dict[str, dict[str, np.ndarray]]) -> None:
    """Keep the newest embeddings (per view) in memory (at most MEMO_BYTES in all, oldest dropped first)."""
    merged = {**_MEMO.pop(key, {}), **views}
    if _nbytes(merged) > MEMO_BYTES:
        return
    _MEMO[key] = merged
    while sum(_nbytes(e) for e in _MEMO.values()) > MEMO_BYTES:
        _MEMO.pop(next(iter(_MEMO)))


class Encoder:
    """Embeds texts with a backbone and a prompt; ``encode_all`` returns every pooling mode."""

    def __init__(
        self,
        backbone: Backbone,
        prompt: Prompt,
        max_length: int = EncodeConfig.max_length,
        batch_size: int = EncodeConfig.batch_size,
        max_tokens: int = EncodeConfig.max_tokens,
        cache_dir: str | os.PathLike | None = None,
        show_progress: bool = True,
        compile: bool = False,
        layers: str = "auto",
        packing: str = "auto",
    ) -> None:
        if layers not in LAYER_POLICIES:
            raise EmbedkitError(f"encode.layers={layers!r}; choose one of {', '.join(LAYER_POLICIES)}")
        self.layers = layers
        self.packing = check_packing(packing)
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
        self.positions = 0  # token positions those passes computed (padding included unless packed)
        self._takes_position_ids = takes_position_ids(backbone.model)
        # padding-free passes (a batch's sequences in one row) where encode.packing says so; ``true`` with a
        # model whose forward takes no position ids fails on the first pass, ``auto`` then stays padded
        self.packed = resolve_packing(self.packing, backbone.device, backbone.dtype, compile) and (
            self._takes_position_ids or self.packing == "true")
        # torch.compile fuses the small ops between matmuls (norms, rotary, activations); dynamic shapes,
        # since every batch has its own width
        self._model = torch.compile(backbone.model, dynamic=True) if compile else backbone.model

    @property
    def n_layers(self) -> int:
        """The number of decoder blocks of the backbone."""
        return num_blocks(self.backbone.model)

    def cache_key(self, texts: list[str], prompt: Prompt | None = None) -> str:
        """SHA-256 of everything the embeddings of ``texts`` depend on (weights, adapter, dtype, prompt,
        max_length, cache version, the texts in order)."""
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_VERSION, self.backbone.fingerprint, (prompt or self.prompt).template,
                             self.max_length]).encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()

    def prompt_for(self, task: str | None) -> Prompt:
        """The prompt (or ensemble) used for ``task``: its ``prompt.per_task`` template if one matches."""
        return self.prompt if task is None else self.prompt.for_task(task)

    def tokenize(self, texts: list[str], prompt: Prompt | None = None) -> list[Tokenized]:
        """The exact token ids of ``texts`` wrapped in this encoder's prompt, each text cut to max_length,
        with the EOS appended (see ``embedkit.embed.prompts.tokenize``)."""
        return tokenize(self.backbone.tokenizer, prompt or self.prompt, texts, self.max_length, append_eos=True)

    def encode(self, texts: list[str], pooling: Pooling, task: str | None = None) -> np.ndarray:
        """Float32 embeddings [len(texts), D] of ``texts`` under one ``pooling`` (and the prompt of
        ``task``, see ``prompt_for``)."""
        n = self.n_layers
        return pooling.select(self.encode_views(texts, pooling.views(n), self.prompt_for(task)), n)

    def encode_all(self, texts: list[str], desc: str = "encoding") -> dict[str, np.ndarray]:
        """Float32 embeddings [len(texts), D] of the last hidden state, for every pooled key (each base
        pooling mode, and ``mean@text``/``weighted_mean@text``), in input order."""
        view = default_view(self.n_layers)
        return self.encode_views(texts, [view], desc=desc)[view]

    def encode_views(self, texts: list[str], views: list[str], prompt: Prompt | None = None,
                     desc: str = "encoding") -> dict[str, dict[str, np.ndarray]]:
        """``{view: {pooled key: [len(texts), D]}}`` for the views asked (see ``pooling.view_key``).

        An ensemble prompt averages its members' unit vectors, each member encoded (or read from the
        cache) as its own prompt."""
        prompt = prompt or self.prompt
        if isinstance(prompt, PromptEnsemble):
            runs = [self._views(texts, views, m, f"{desc} [{m.name}]") for m in prompt.members]
            return {v: {k: np.mean([_unit(r[v][k]) for r in runs], axis=0).astype(np.float32) for k in runs[0][v]}
                    for v in views}
        return self._views(texts, views, prompt, desc)

    def _views(self, texts: list[str], views: list[str], prompt: Prompt, desc: str) -> dict:
        texts = list(texts)
        got, key = {}, None
        if self.cache_dir is not None:
            key = self.cache_key(texts, prompt)
            memo = _MEMO.get(key, {})
            for v in views:
                if v in memo:
                    got[v] = memo[v]
                    continue
                flush_cache_writes()  # a file may still be queued
                if (stored := _read_view(self.cache_dir, key, v, self.n_layers)) is not None:
                    got[v] = stored
            if len(got) == len(views):
                self.cache_hits += 1
                log.info("%s: %d texts from the embedding cache", desc, len(texts))
                _remember(key, got)
                return {v: _float32(got[v]) for v in views}  # copies: callers may change theirs
        todo = self._pass_views([v for v in views if v not in got])
        unique = list(dict.fromkeys(texts))
        pooled = self._encode_unique(unique, todo, prompt, desc)
        index = {t: i for i, t in enumerate(unique)}
        rows = np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
        out = {v: {k: a[rows] for k, a in pooled[v].items()} for v in todo}
        if key is not None:
            for v, arrays in out.items():
                _write_later(self.cache_dir, key, v, arrays, self.n_layers)
            _remember(key, out)
        return {v: _float32(got.get(v) or out[v]) for v in views}

    def _pass_views(self, missing: list[str]) -> list[str]:
        """The views one forward pass computes: those missing, and, with the embedding cache on, every block
        for ``layers=all`` or for ``layers=auto`` when a block other than the last hidden state is asked (a
        layer sweep is likely)."""
        n = self.n_layers
        # without the embedding cache no later job could read the extra blocks: pool only what is asked
        every = self.cache_dir is not None and (
            self.layers == "all" or (self.layers == "auto" and missing != [default_view(n)]))
        if not every:
            return missing
        flags = {parse_view(v)[1] for v in missing if parse_view(v)[0] != n - 1} or {False}
        extra = [view_key(i, f) for f in sorted(flags) for i in range(n)]
        return list(dict.fromkeys([*missing, default_view(n), *extra]))

    @torch.inference_mode()
    def _encode_unique(self, texts: list[str], views: list[str], prompt: Prompt, desc: str) -> dict:
        tok = self.backbone.tokenizer
        items = self.tokenize(texts, prompt)
        n_trunc = sum(t.truncated for t in items)
        if n_trunc:
            log.info("%s: %d of %d texts cut to %d tokens", desc, n_trunc, len(items), self.max_length)
        lengths = [len(t.ids) for t in items]
        batches = length_batches(lengths, self.batch_size, self.max_tokens)
        # torch.compile serves the last hidden state; hooked blocks and packed passes run the plain model
        model = self._model if views == [default_view(self.n_layers)] and not self.packed else self.backbone.model
        device = self.backbone.device
        dim = self.backbone.model.config.hidden_size
        # the last hidden state in float32; other views in float16 (half the memory of a layer sweep), a view
        # switching to float32 from the batch on where float16 would overflow
        default = default_view(self.n_layers)
        result = {v: {k: np.empty((len(texts), dim), dtype=np.float32 if v == default else np.float16)
                      for k in POOLED_KEYS} for v in views}
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not self.show_progress,
                   dynamic_ncols=True)
        pending = list(reversed(batches))
        while pending:
            batch = pending.pop()
            seqs = [items[i].ids for i in batch]
            ids, mask = collate(seqs, tok.pad_token_id, device)
            tmask = text_mask([items[i].text_span for i in batch], [len(s) for s in seqs], ids.shape[1], device)
            try:
                pooled = pooled_views(model, ids, mask, views, tmask, self._takes_position_ids, packed=self.packed)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise EmbedkitError(
                        f"{desc}: out of GPU memory on a single text of {ids.shape[1]} tokens; lower "
                        "encode.max_length or use a smaller model.dtype") from None
                del ids, mask, tmask
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                log.warning("%s: out of GPU memory on a batch of %d texts x %d tokens; retrying as two "
                            "batches of %d and %d (lower encode.max_tokens to avoid this)", desc, len(batch),
                            len(items[batch[0]].ids), half, len(batch) - half)
                pending += [batch[half:], batch[:half]]
                continue
            self.forward_calls += 1
            self.positions += int(mask.sum()) if self.packed else mask.numel()
            for v, by_key in pooled.items():
                for k, vec in by_key.items():
                    vec = vec.cpu().numpy()
                    if result[v][k].dtype == np.float16 and np.abs(vec).max(initial=0) >= 65000:
                        result[v][k] = result[v][k].astype(np.float32)
                    result[v][k][batch] = vec
            bar.update(len(batch))
        bar.close()
        self.texts_encoded += len(texts)
        return result


def _float32(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 copies of one view's arrays (held in float16 for views other than the last hidden state)."""
    return {k: a.astype(np.float32) for k, a in arrays.items()}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _view_path(cache_dir: Path, key: str, view: str, n_layers: int) -> Path:
    # the last hidden state keeps the file name it had before views existed, so old caches still hit
    if view == default_view(n_layers):
        return cache_dir / key[:2] / f"{key}.npz"
    return cache_dir / key[:2] / key / f"{view}.npz"


def _read_view(cache_dir: Path, key: str, view: str, n_layers: int) -> dict[str, np.ndarray] | None:
    path = _view_path(cache_dir, key, view, n_layers)
    if not path.exists():
        return None
    with np.load(path) as z:
        if not all(k in z.files for k in POOLED_KEYS):  # written before span=text existed
            return None
        return {k: z[k] for k in POOLED_KEYS}


def _write_view(cache_dir: Path, key: str, view: str, arrays: dict[str, np.ndarray], n_layers: int) -> None:
    path = _view_path(cache_dir, key, view, n_layers)
    if path.exists() and _read_view(cache_dir, key, view, n_layers) is not None:
        return
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)  # as held: float16 for views other than the last hidden state
