"""Prompt templates and the exact tokenization of wrapped texts.

A template holds ``{text}`` once (or more: echo embeddings). Following echo-embeddings, the fixed
pieces and the text are tokenized separately and concatenated, so (1) the text is truncated to ``max_length`` tokens
*before* wrapping and the prompt is never cut off, and (2) which tokens belong to the text is exact by
construction (``Tokenized.text_span``), whatever the template.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import EmbedkitError

PLACEHOLDER = "{text}"
_CONF_PROMPTS = "prompt"  # the config group whose options an ensemble's members name


@dataclass(frozen=True)
class Prompt:
    """A prompt template with ``{text}`` (``conf/prompt``); ``name`` labels results.

    The text may appear more than once (echo embeddings, Springer et al. 2025: ``Rewrite the sentence:
    {text}\nRewritten sentence: {text}``): every copy is cut the same way and ``span=text`` pools the
    last copy. ``per_task`` maps task names or glob patterns (``Arxiv*``) to templates used for those
    tasks instead of ``template`` (MTEB-style instructions); training and export use ``template``."""
    name: str
    template: str
    per_task: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        n = self.template.count(PLACEHOLDER) if isinstance(self.template, str) else 0
        if n < 1:
            raise EmbedkitError(
                f"prompt '{self.name}': the template must contain '{PLACEHOLDER}' (found it {n} times) in "
                f"{self.template!r}. Example: prompt.template='This sentence: \"{{text}}\" means in one word:'"
            )
        per_task = dict(self.per_task or {})
        for pattern, template in per_task.items():
            if not isinstance(template, str) or PLACEHOLDER not in template:
                raise EmbedkitError(f"prompt.per_task[{pattern!r}]={template!r}: a template with '{PLACEHOLDER}' is "
                                    "needed, e.g. prompt.per_task={Arxiv*:'Identify the arXiv category of: {text}'}")
        object.__setattr__(self, "per_task", per_task)

    @property
    def parts(self) -> list[str]:
        """The fixed pieces around the copies of ``{text}`` (one more than the copies)."""
        return self.template.split(PLACEHOLDER)

    @property
    def copies(self) -> int:
        """How many times the text appears (2 for echo templates)."""
        return len(self.parts) - 1

    @property
    def prefix(self) -> str:
        """The template before the first ``{text}``."""
        return self.parts[0]

    @property
    def suffix(self) -> str:
        """The template after the last ``{text}``."""
        return self.parts[-1]

    @property
    def members(self) -> tuple["Prompt", ...]:
        """The prompts whose embeddings this one averages: itself."""
        return (self,)

    def wrap(self, text: str) -> str:
        """``text`` inside the template (as a string; tokenization wraps token ids, see ``tokenize``)."""
        return text.join(self.parts)

    def for_task(self, task: str) -> "Prompt":
        """The prompt for ``task``: its ``per_task`` template (exact name first, then the first matching
        glob), else this prompt's template."""
        template = self.per_task.get(task) or next(
            (t for p, t in self.per_task.items() if fnmatch.fnmatchcase(task, p)), None)
        return Prompt(self.name, template) if template else Prompt(self.name, self.template)

    def unmatched_patterns(self, tasks: list[str]) -> list[str]:
        """The ``per_task`` keys that match none of ``tasks``."""
        return [p for p in self.per_task if not any(t == p or fnmatch.fnmatchcase(t, p) for t in tasks)]


def prompt_option(name: str) -> Prompt:
    """The prompt of the config option ``conf/prompt/<name>.yaml`` (e.g. ``eol``, ``metaeol/sentiment``)."""
    from omegaconf import OmegaConf

    root = importlib.resources.files("embedkit.conf") / _CONF_PROMPTS
    path = root / f"{name}.yaml"
    if not path.is_file():
        options = sorted(str(p.relative_to(root))[:-5] for p in Path(str(root)).rglob("*.yaml"))
        raise EmbedkitError(f"prompt member {name!r} is not a prompt option; choose from {', '.join(options)} or "
                            "give a template with {text}")
    node = OmegaConf.load(str(path))
    if "members" in node:
        raise EmbedkitError(f"prompt member {name!r} is itself an ensemble; list its members instead")
    return Prompt(str(node.name), str(node.template))


@dataclass(frozen=True)
class PromptEnsemble:
    """Several prompts whose (unit-length) embeddings are averaged (MetaEOL, Lei et al. 2024).

    ``members`` are prompt option names (``eol``, ``metaeol/sentiment``) or templates with ``{text}``.
    Each member is encoded as its own prompt, through the embedding cache, so an ensemble of prompts that
    a sweep already ran costs no forward pass."""
    name: str
    members: tuple = ()

    def __post_init__(self) -> None:
        raw = list(self.members or [])
        if not raw:
            raise EmbedkitError(f"prompt '{self.name}': an ensemble needs members, e.g. "
                                "prompt=ensemble 'prompt.members=[eol,cluster,sum]'")
        prompts = []
        for i, m in enumerate(raw):
            if isinstance(m, Prompt):
                prompts.append(m)
            elif isinstance(m, str) and PLACEHOLDER in m:
                prompts.append(Prompt(f"{self.name}[{i}]", m))
            elif isinstance(m, str):
                prompts.append(prompt_option(m))
            else:
                raise EmbedkitError(f"prompt.members[{i}]={m!r}: give a prompt option name or a template with "
                                    f"{PLACEHOLDER}")
        object.__setattr__(self, "members", tuple(prompts))

    @property
    def template(self) -> str:
        """The members' templates, one per line (what results record and caches key on)."""
        return "\n".join(m.template for m in self.members)

    @property
    def copies(self) -> int:
        """The most copies of the text in any member."""
        return max(m.copies for m in self.members)

    @property
    def per_task(self) -> dict:
        """Ensembles have no per-task templates."""
        return {}

    def for_task(self, task: str) -> "PromptEnsemble":
        """The same ensemble for every task."""
        return self

    def unmatched_patterns(self, tasks: list[str]) -> list[str]:
        """No per-task patterns."""
        return []


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one wrapped text: ``[special prefix] prefix text suffix [eos]``."""

    ids: tuple[int, ...]
    text_span: tuple[int, int]  # [start, end) of the text's own tokens in ``ids`` (its last copy)
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
    if isinstance(prompt, PromptEnsemble):
        raise EmbedkitError(f"prompt '{prompt.name}' is an ensemble: tokenize each of its members")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    parts = prompt.parts
    head = special_prefix(tokenizer) + enc(parts[0])
    middles = [enc(p) for p in parts[1:-1]]  # between copies of the text (echo templates)
    tail = enc(parts[-1])
    if append_eos:
        tail = tail + [tokenizer.eos_token_id]
    bodies = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    # An empty text still needs one token of its own (last-token pooling reads it): use a space.
    blank = tokenizer(" ", add_special_tokens=False)["input_ids"][:1] or [tokenizer.eos_token_id]
    out = []
    for body in bodies:
        cut = body[:max_length] or blank
        ids = head + cut
        for middle in middles:
            ids = ids + middle + cut
        out.append(Tokenized(ids=tuple(ids + tail), text_span=(len(ids) - len(cut), len(ids)),
                             truncated=len(body) > max_length))
    return out
