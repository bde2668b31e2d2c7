"""Prompt templates and the exact tokenization of wrapped texts.

A template holds exactly one ``{text}``. Following echo-embeddings, the prefix, the text and the suffix
are tokenized separately and concatenated, so (1) the text is truncated to ``max_length`` tokens
*before* wrapping and the prompt is never cut off, and (2) which tokens belong to the text is exact by
construction (``Tokenized.text_span``), whatever the template.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedkit.errors import EmbedkitError

PLACEHOLDER = "{text}"


@dataclass(frozen=True)
class Prompt:
    """A prompt template with exactly one ``{text}`` (``conf/prompt``); ``name`` labels results."""
    name: str
    template: str

    def __post_init__(self) -> None:
        n = self.template.count(PLACEHOLDER) if isinstance(self.template, str) else 0
        if n != 1:
            raise EmbedkitError(
                f"prompt '{self.name}': the template must contain '{PLACEHOLDER}' exactly once "
                f"(found {n} times) in {self.template!r}. Example: "
                "prompt.template='This sentence: \"{text}\" means in one word:'"
            )

    @property
    def prefix(self) -> str:
        """The template before ``{text}``."""
        return self.template.split(PLACEHOLDER)[0]

    @property
    def suffix(self) -> str:
        """The template after ``{text}``."""
        return self.template.split(PLACEHOLDER)[1]

    def wrap(self, text: str) -> str:
        """``text`` inside the template (as a string; tokenization wraps token ids, see ``tokenize``)."""
        return self.prefix + text + self.suffix


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one wrapped text: ``[special prefix] prefix text suffix [eos]``."""

    ids: tuple[int, ...]
    text_span: tuple[int, int]  # [start, end) of the text's own tokens in ``ids``
    truncated: bool


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (e.g. Llama's BOS); empty for most others."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def tokenize(
    tokenizer,
    prompt: Prompt,
    texts: list[str],
    max_length: int,
    append_eos: bool = True,
) -> list[Tokenized]:
    """Tokenize ``texts`` wrapped in ``prompt``; each text is cut to ``max_length`` tokens first."""
    if max_length < 1:
        raise EmbedkitError(f"encode.max_length must be >= 1, got {max_length}")
    if append_eos and tokenizer.eos_token_id is None:
        raise EmbedkitError("the tokenizer has no EOS token, which EOS pooling needs")
    head = special_prefix(tokenizer)
    head += tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else []
    tail = tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"] if prompt.suffix else []
    if append_eos:
        tail = tail + [tokenizer.eos_token_id]
    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    # An empty text still needs one token of its own (last-token pooling reads it): use a space.
    blank = tokenizer(" ", add_special_tokens=False)["input_ids"][:1] or [tokenizer.eos_token_id]
    out = []
    for body in bodies:
        cut = body[:max_length] or blank
        out.append(
            Tokenized(
                ids=tuple(head + cut + tail),
                text_span=(len(head), len(head) + len(cut)),
                truncated=len(body) > max_length,
            )
        )
    return out
