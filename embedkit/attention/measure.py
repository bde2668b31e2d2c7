"""Where the final token looks: exact token roles, the final token's attention rows and their shares,
for example texts and over a data set (the measurements behind ``embedkit-attention``).

- The input is exactly what the encoder embeds: ``prompts.tokenize`` wraps the text (cut to
  ``attention.max_length`` tokens first) in the template, so which tokens are the text's own and which are
  the prompt's is known by construction, never by string search. **No EOS is appended**: the final token
  is the prompt's last token, whose hidden state is the ``last`` pooling (the encoder appends EOS, but in
  a causal model the states before it do not see it, so this row is the one behind ``last``).
- The model is loaded with ``attn_implementation="eager"`` for this analysis only (SDPA, which the
  encoder keeps, returns no attention weights; see ``embedkit.attention.variants``). For each layer, the
  final token's attention row (the softmax over all positions, including itself) is reduced over heads by
  ``mean`` (a distribution that sums to 1) or ``max``.
- The attention sink is position 0: the BOS token where the tokenizer adds one (Llama), else the first
  token of the input (SmolLM2's tokenizer adds no BOS, so the prompt's first word, or the text's first
  token with ``prompt=none``). Its mass is reported and then dropped: bar charts show the other
  positions, and shares are fractions of the non-sink mass.
- Text share = mass on the text's own tokens / non-sink mass; prompt share = the rest (the final token
  is a prompt token unless the template ends with ``{text}``). The CSVs also give the text's share of the
  non-sink *positions*: what uniform attention would give.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from embedkit.embed.encoder import collate, length_batches, takes_position_ids
from embedkit.embed.models import Backbone
from embedkit.embed.prompts import Prompt, Tokenized, special_prefix, tokenize
from embedkit.errors import EmbedkitError

log = logging.getLogger("embedkit.attention.measure")

HEAD_REDUCTIONS = ("mean", "max")
TEXT, PROMPT, SPECIAL = "text", "prompt", "special"
# Attention maps of all layers are held at once (output_attentions): cap a batch's share of memory.
ATTENTION_BUDGET_BYTES = 512 * 2**20
MAX_BATCH = 16


# --- tokens: exact roles and readable labels ---------------------------------------------------------

def token_roles(item: Tokenized, n_special: int) -> list[str]:
    """Role of every position of a tokenized input: ``special`` (tokenizer's own prefix, e.g. BOS),
    ``text`` (the text's own tokens, exact by construction) or ``prompt``.

    Takes the tokenized input and the length of the tokenizer's special prefix; returns one role a position."""
    s, e = item.text_span
    return [SPECIAL if i < n_special else TEXT if s <= i < e else PROMPT for i in range(len(item.ids))]


def token_label(tokenizer, token_id: int) -> str:
    """A readable label of ``token_id``: the decoded token without its leading space; whitespace made visible."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # part of a multi-byte character: show the raw token
        text = tokenizer.convert_ids_to_tokens(token_id)
    text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return text.strip(" ") or "␣"


# --- the attention rows -------------------------------------------------------------------------------

def require_eager(backbone: Backbone) -> None:
    """Raise an ``EmbedkitError`` unless ``backbone`` was loaded with eager attention (returns None)."""
    impl = getattr(backbone.model.config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        raise EmbedkitError(
            f"model '{backbone.name}' was loaded with attn_implementation='{impl}', which does not return "
            "attention weights; load it with attn_implementation='eager' for attention analysis "
            "(embedkit-attention does this itself; the encoder keeps SDPA)")


@torch.inference_mode()
def final_token_rows(backbone: Backbone, items: list[Tokenized], heads: str = "mean") -> list[np.ndarray]:
    """For each input, the final token's attention row in every layer, reduced over heads.

    Returns one float64 array [n_layers, len(ids)] per input (position 0 = sink included). With
    ``heads="mean"`` each layer's row is a distribution over the positions (sums to 1)."""
    if heads not in HEAD_REDUCTIONS:
        raise EmbedkitError(f"attention.heads must be one of {', '.join(HEAD_REDUCTIONS)}, got {heads!r}")
    require_eager(backbone)
    model, device, tok = backbone.model, backbone.device, backbone.tokenizer
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", 32)
    n_heads = getattr(cfg, "num_attention_heads", 32)
    lengths = [len(t.ids) for t in items]
    takes_positions = takes_position_ids(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[np.ndarray | None] = [None] * len(items)
    per_cell = n_layers * n_heads * 4  # bytes of attention weights per (query, key) position
    for batch in length_batches(lengths, MAX_BATCH, ATTENTION_BUDGET_BYTES,
                                cost=lambda width, rows: rows * width * width * per_cell):
        width = max(lengths[i] for i in batch)
        ids, mask = collate([items[i].ids for i in batch], pad, device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "output_attentions": True}
        if takes_positions:
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attentions = getattr(model(**kwargs), "attentions", None)
        if not attentions or any(a is None for a in attentions):
            impl = getattr(cfg, "_attn_implementation", "unknown")
            raise EmbedkitError(
                f"model '{backbone.name}' returned no attention weights (attention implementation '{impl}'). "
                "Attention analysis needs a model whose eager attention returns them "
                "(output_attentions=True); this model class does not")
        # [B, layers, heads, T]: the last query position is the final token of every (left-padded) row
        rows = torch.stack([a[:, :, -1, :].float() for a in attentions], dim=1)
        reduced = rows.mean(2) if heads == "mean" else rows.amax(2)
        reduced = reduced.double().cpu().numpy()
        for r, i in enumerate(batch):
            out[i] = reduced[r, :, width - lengths[i]:]
    return out  # type: ignore[return-value]


@dataclass
class Shares:
    """Per layer: sink mass (raw row) and the shares of the non-sink mass (arrays of [n_layers])."""

    sink: np.ndarray
    text: np.ndarray
    prompt: np.ndarray
    special: np.ndarray
    text_positions: float  # text's share of the non-sink positions (what uniform attention gives)


def shares(row: np.ndarray, roles: list[str]) -> Shares:
    """Split one input's rows ([n_layers, T], sink at position 0) by ``roles``: the sink's mass and the
    text's, prompt's and special tokens' shares of the rest, per layer."""
    rest, rest_roles = row[:, 1:], np.array(roles[1:])
    total = rest.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        part = {r: rest[:, rest_roles == r].sum(axis=1) / total for r in (TEXT, PROMPT, SPECIAL)}
    n = max(len(roles) - 1, 1)
    return Shares(row[:, 0], part[TEXT], part[PROMPT], part[SPECIAL], float((rest_roles == TEXT).sum() / n))


# --- example texts -----------------------------------------------------------------------------------------

@dataclass
class Example:
    """One text through one variant: tokens, roles and the final token's rows per layer."""

    variant: str
    ids: tuple[int, ...]
    labels: list[str]
    roles: list[str]
    rows: np.ndarray  # [n_layers, T], sink included
    truncated: bool


def run_examples(backbones: dict[str, Backbone], prompt: Prompt, texts: list[str], heads: str,
                 max_length: int) -> list[list[Example]]:
    """Each text wrapped in ``prompt`` (cut to ``max_length`` tokens) through every variant of ``backbones``
    (name -> backbone). Returns ``result[i][v]``: text ``i`` through variant ``v`` (in the order given)."""
    any_backbone = next(iter(backbones.values()))
    tok = any_backbone.tokenizer
    items = tokenize(tok, prompt, texts, max_length, append_eos=False)
    n_special = len(special_prefix(tok))
    labels = [[token_label(tok, i) for i in item.ids] for item in items]
    per_variant = {name: final_token_rows(b, items, heads) for name, b in backbones.items()}
    return [[Example(name, item.ids, labels[i], token_roles(item, n_special), per_variant[name][i], item.truncated)
             for name in backbones] for i, item in enumerate(items)]


# --- the aggregate over a data set ---------------------------------------------------------------------

@dataclass
class Aggregate:
    """One data task through one variant: the shares of every kept text (inputs longer than the sink)."""

    task: str
    variant: str
    n_texts: int
    n_truncated: int
    n_skipped: int  # inputs with no position besides the sink
    per_text: list[Shares]
    indices: list[int]  # index of each kept text in the task's texts

    def layer_stats(self) -> dict[str, np.ndarray]:
        """Per layer, over the kept texts: the mean shares (and the text share's standard deviation), the
        mean sink mass and the text's share of the positions; each an array of [n_layers]."""
        keep = self.per_text
        stack = {k: np.stack([getattr(s, k) for s in keep]) for k in ("sink", "text", "prompt", "special")}
        n = len(keep)
        return {
            "text_share": stack["text"].mean(0), "text_share_sd": stack["text"].std(0, ddof=1) if n > 1
            else np.zeros(stack["text"].shape[1]), "prompt_share": stack["prompt"].mean(0),
            "special_share": stack["special"].mean(0), "sink_mass": stack["sink"].mean(0),
            "text_positions": np.full(stack["text"].shape[1], np.mean([s.text_positions for s in keep])),
        }


def run_aggregate(backbones: dict[str, Backbone], prompt: Prompt, task: str, texts: list[str], heads: str,
                  max_length: int) -> list[Aggregate]:
    """The texts of data task ``task`` through every variant of ``backbones`` (name -> backbone); returns
    one ``Aggregate`` a variant, in the order given."""
    tok = next(iter(backbones.values())).tokenizer
    items = tokenize(tok, prompt, texts, max_length, append_eos=False)
    n_special = len(special_prefix(tok))
    roles = [token_roles(item, n_special) for item in items]
    out = []
    for name, backbone in backbones.items():
        t0 = time.perf_counter()
        rows = final_token_rows(backbone, items, heads)
        keep = [i for i, r in enumerate(roles) if len(r) > 1]
        if not keep:
            raise EmbedkitError(f"{task}: every input is a single token, so there is no attention besides the sink")
        per_text = [shares(rows[i], roles[i]) for i in keep]
        out.append(Aggregate(task, name, len(per_text), sum(i.truncated for i in items),
                             len(items) - len(per_text), per_text, keep))
        log.info("%s / %s: %d texts in %.1f s", task, name, len(items), time.perf_counter() - t0)
    return out
