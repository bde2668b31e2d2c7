"""``embedkit-attention``: where the final token looks, before and after fine-tuning.

    embedkit-attention                                          # base model, prompt=cluster, example + stdlib
    embedkit-attention prompt=eol 'attention.texts=["A jaguar was seen near the river."]'
    embedkit-attention model.adapter=outputs/.../adapter        # base and adapter side by side
    embedkit-attention 'attention.variants=[base,{name:step100,adapter:/path/a100},{name:step2k,adapter:/path/a2k}]'
    embedkit-attention data=jsonl data.root=../shared/data/clustering \
        'data.include=[twentynewsgroups/test.jsonl]' attention.n_texts=100 attention.layers=all

What is measured (the paper's attention analysis, plus an aggregate over a data set):

- The input is exactly what the encoder embeds: ``prompts.tokenize`` wraps the text (cut to
  ``attention.max_length`` tokens first) in the template, so which tokens are the text's own and which are
  the prompt's is known by construction, never by string search. **No EOS is appended**: the final token
  is the prompt's last token, whose hidden state is the ``last`` pooling (the encoder appends EOS, but in
  a causal model the states before it do not see it, so this row is the one behind ``last``).
- The model is loaded with ``attn_implementation="eager"`` for this analysis only (SDPA, which the
  encoder keeps, returns no attention weights). For each layer, the final token's attention row (the
  softmax over all positions, including itself) is reduced over heads by ``mean`` (a distribution that
  sums to 1) or ``max``.
- The attention sink is position 0: the BOS token where the tokenizer adds one (Llama), else the first
  token of the input (SmolLM2's tokenizer adds no BOS, so the prompt's first word, or the text's first
  token with ``prompt=none``). Its mass is reported and then dropped: bar charts show the other
  positions, and shares are fractions of the non-sink mass.
- Text share = mass on the text's own tokens / non-sink mass; prompt share = the rest (the final token
  is a prompt token unless the template ends with ``{text}``). The CSVs also give the text's share of the
  non-sink *positions*: what uniform attention would give.

Outputs (in the Hydra run folder, ``outputs/attention/<time>_<model>_<prompt>/``): ``example_<i>.png``
(one panel per variant, side by side) and ``tokens.csv`` for the example texts; ``aggregate_layers.png``,
``aggregate_layers.csv`` (per task, variant and layer), ``aggregate.csv`` (per task and variant, at the
selected layers), ``aggregate_texts.csv`` (per text) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from embedkit.commands.common import quiet_libraries, user_errors_as_messages
from embedkit.embed.encoder import collate, length_batches, takes_position_ids
from embedkit.errors import EmbedkitError, find_user_error, interrupts_as_messages
from embedkit.io import atomic_write, write_json
from embedkit.embed.models import Backbone
from embedkit.embed.prompts import Prompt, Tokenized, special_prefix, tokenize

log = logging.getLogger("embedkit.attention.measure")

HEAD_REDUCTIONS = ("mean", "max")
TEXT, PROMPT, SPECIAL = "text", "prompt", "special"
COLOURS = {TEXT: "#d9711c", PROMPT: "#7f8c9a", SPECIAL: "#b0b0b0"}
# Attention maps of all layers are held at once (output_attentions): cap a batch's share of memory.
ATTENTION_BUDGET_BYTES = 512 * 2**20
MAX_BATCH = 16


# --- configuration pieces ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One model variant: the base model (``adapter=None``) or the base model with a peft adapter."""

    name: str
    adapter: str | None = None


def parse_variants(spec, model_adapter: str | None = None) -> list[Variant]:
    """``attention.variants``: null (base, plus ``model.adapter`` if set) or a list whose items are
    ``base``/null, an adapter folder, or ``{name, adapter}``."""
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None:
        spec = [None] if not model_adapter else [None, model_adapter]
    elif model_adapter:
        raise EmbedkitError(
            "both model.adapter and attention.variants are set; list every variant in attention.variants "
            "(e.g. 'attention.variants=[base,{name:tuned,adapter:/path/to/adapter}]') and leave model.adapter "
            "null, or give only model.adapter (then base and adapter are compared)")
    if isinstance(spec, (str, dict)):
        spec = [spec]
    if not isinstance(spec, list) or not spec:
        raise EmbedkitError(f"attention.variants must be a non-empty list, got {spec!r}; e.g. "
                            "'attention.variants=[base,{name:tuned,adapter:/path/to/adapter}]'")
    out = []
    for item in spec:
        if item is None or (isinstance(item, str) and item.strip().lower() in ("base", "none", "null", "")):
            out.append(Variant("base", None))
        elif isinstance(item, str):
            out.append(Variant(Path(item).expanduser().name or item, item))
        elif isinstance(item, dict) and set(item) <= {"name", "adapter"}:
            adapter = item.get("adapter") or None
            name = item.get("name") or (Path(adapter).expanduser().name if adapter else "base")
            out.append(Variant(str(name), None if adapter is None else str(adapter)))
        else:
            raise EmbedkitError(f"attention.variants: cannot read {item!r}; each item is 'base', an adapter "
                                "folder, or {name: ..., adapter: ...}")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EmbedkitError(f"attention.variants: the name(s) {', '.join(dupes)} occur more than once; give each "
                            "variant its own name: {name: step100, adapter: ...}")
    for v in out:
        if v.adapter is not None:
            adapter_files(v.adapter)  # a missing folder or file stops the run before any model work
    return out


def check_layer_spec(spec) -> None:
    """Syntax check of ``attention.layers`` before the model is loaded (the range is checked after)."""
    parse_layers(spec, None)


def parse_layers(spec, n_layers: int | None) -> list[int]:
    """``last`` | ``all`` | an index (0-based; negative counts from the end) | ``"a-b"`` (inclusive) | a list.

    With ``n_layers=None`` only the syntax is checked (returns [])."""
    if isinstance(spec, ListConfig):
        spec = list(spec)
    hint = "attention.layers must be last, all, a layer index (0-based, -1 = last), a range like 20-29, or a list"
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "last":
            spec = [-1]
        elif s == "all":
            return list(range(n_layers)) if n_layers else []
        elif re.fullmatch(r"-?\d+", s):
            spec = [int(s)]
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", s):
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise EmbedkitError(f"attention.layers={spec!r}: the range starts after it ends; write {b}-{a}")
            spec = list(range(a, b + 1))
        else:
            raise EmbedkitError(f"{hint}; got {spec!r}")
    elif isinstance(spec, bool) or spec is None:
        raise EmbedkitError(f"{hint}; got {spec!r}")
    elif isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, list) or not spec or not all(isinstance(x, int) and not isinstance(x, bool)
                                                         for x in spec):
        raise EmbedkitError(f"{hint}; got {spec!r}")
    if n_layers is None:
        return []
    out = []
    for x in spec:
        if not -n_layers <= x < n_layers:
            raise EmbedkitError(f"attention.layers: layer {x} does not exist; the model has {n_layers} layers "
                                f"(0 to {n_layers - 1}, or -1 for the last)")
        out.append(x % n_layers)
    return sorted(set(out))


def layer_description(layers: list[int], n_layers: int) -> str:
    if layers == list(range(n_layers)):
        return f"mean of all {n_layers} layers"
    if len(layers) == 1:
        return f"layer {layers[0]}" + (f" (last of {n_layers})" if layers[0] == n_layers - 1 else f" of 0-{n_layers - 1}")
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"mean of layers {layers[0]}-{layers[-1]} (of 0-{n_layers - 1})"
    return f"mean of layers {','.join(map(str, layers))} (of 0-{n_layers - 1})"


# --- tokens: exact roles and readable labels ---------------------------------------------------------

def token_roles(item: Tokenized, n_special: int) -> list[str]:
    """Role of every position of a tokenized input: ``special`` (tokenizer's own prefix, e.g. BOS),
    ``text`` (the text's own tokens, exact by construction) or ``prompt``."""
    s, e = item.text_span
    return [SPECIAL if i < n_special else TEXT if s <= i < e else PROMPT for i in range(len(item.ids))]


def token_label(tokenizer, token_id: int) -> str:
    """A readable label: the decoded token without its leading space; whitespace made visible."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # part of a multi-byte character: show the raw token
        text = tokenizer.convert_ids_to_tokens(token_id)
    text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return text.strip(" ") or "␣"


# --- the attention rows -------------------------------------------------------------------------------

def require_eager(backbone: Backbone) -> None:
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
    rest, rest_roles = row[:, 1:], np.array(roles[1:])
    total = rest.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        part = {r: rest[:, rest_roles == r].sum(axis=1) / total for r in (TEXT, PROMPT, SPECIAL)}
    n = max(len(roles) - 1, 1)
    return Shares(row[:, 0], part[TEXT], part[PROMPT], part[SPECIAL], float((rest_roles == TEXT).sum() / n))


# --- loading the variants -----------------------------------------------------------------------------

def adapter_files(adapter: str) -> tuple[Path, Path]:
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise EmbedkitError(f"adapter {adapter!r}: no such folder (expected a saved peft adapter, i.e. a folder "
                            "with adapter_config.json and adapter_model.safetensors)")
    config = folder / "adapter_config.json"
    weights = next((p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin")
                    if p.is_file()), None)
    if not config.is_file() or weights is None:
        raise EmbedkitError(f"adapter {adapter!r}: {folder} is not a saved peft adapter (it lacks "
                            f"{'adapter_config.json' if not config.is_file() else 'adapter_model.safetensors'}); "
                            "save one with peft's model.save_pretrained(folder)")
    return config, weights


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _base_names(backbone: Backbone) -> set[str]:
    names = {backbone.source, backbone.name, backbone.info.get("source"), backbone.info.get("gguf_package")}
    return {Path(str(n).rstrip("/")).name.lower() for n in names if n}


def check_adapter(adapter: str, base: Backbone, allow_base_mismatch: bool = False) -> dict:
    """Stop with a clear message when ``adapter`` was not made for ``base``'s model.

    Every LoRA matrix must fit a module of the base model (name and shape); and the base model the
    adapter records (``base_model_name_or_path``) must name the same model, unless
    ``allow_base_mismatch``. Returns the adapter's config."""
    config_path, weights = adapter_files(adapter)
    try:
        acfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmbedkitError(f"adapter {adapter!r}: cannot read {config_path}: {e}") from None
    recorded = acfg.get("base_model_name_or_path") or None
    fix = ("use the adapter with the base model it was trained on "
           f"({'model.name_or_path=' + recorded if recorded else 'the same model config as in training'})")
    modules = dict(getattr(base.model, "get_base_model", lambda: base.model)().named_modules())
    problems = []
    for key, shape in _weight_shapes(weights).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            continue
        path, which = m.groups()
        module = modules.get(path)
        if module is None and path.startswith("model.") and path[len("model."):] in modules:
            problems.append(f"it targets '{path}', a module of a model with an LM head (which wraps the base "
                            f"model as 'model.'); embedkit loads the base model without its head, where the module "
                            f"is '{path[len('model.'):]}': save the adapter from the base model (AutoModel)")
            break
        if module is None:
            problems.append(f"the model has no module '{path}'")
        elif isinstance(module, torch.nn.Linear) and len(shape) == 2:
            want = module.in_features if which == "A" else module.out_features
            got = shape[1] if which == "A" else shape[0]
            if want != got:
                problems.append(f"'{path}' has {'in' if which == 'A' else 'out'}_features {want}, the adapter "
                                f"expects {got}")
        if len(problems) >= 3:
            break
    if problems:
        raise EmbedkitError(
            f"adapter {adapter!r} was made for another base model ({recorded or 'not recorded'}), not for "
            f"'{base.name}' ({base.source}): {'; '.join(problems)}. {fix[0].upper() + fix[1:]}")
    if recorded and Path(recorded.rstrip("/")).name.lower() not in _base_names(base) and not allow_base_mismatch:
        raise EmbedkitError(
            f"adapter {adapter!r} was trained on base model '{recorded}' (adapter_config.json: "
            f"base_model_name_or_path), but the model here is '{base.name}' ({base.source}). Its shapes fit, so "
            f"it may be a different checkpoint of the same architecture: {fix}, or, if you know the weights are "
            "the same, set attention.allow_base_mismatch=true")
    return acfg


def load_eager(model_cfg: DictConfig, adapter: str | None = None) -> Backbone:
    """The configured backbone with eager attention (and optionally an adapter)."""
    from hydra.utils import instantiate

    requested = model_cfg.get("attn_implementation")
    if requested not in (None, "eager", "sdpa"):
        log.info("model.attn_implementation=%s replaced by eager for attention analysis", requested)
    try:
        return instantiate(model_cfg, attn_implementation="eager", adapter=adapter)
    except Exception as e:  # noqa: BLE001 - translate the known failures into words
        user = find_user_error(e)
        if user is not None:
            raise user from None
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:400]
        if adapter and isinstance(cause, (RuntimeError, ValueError, KeyError)):
            raise EmbedkitError(f"adapter {adapter!r} could not be applied to the model: {msg}; it was probably "
                                "trained on another base model (use it with the model it was trained on)") from e
        if isinstance(cause, (ValueError, NotImplementedError)) and ("attn_implementation" in msg or "eager" in msg
                                                                     or "attention" in msg.lower()):
            raise EmbedkitError(
                f"model '{model_cfg.get('name') or model_cfg.get('name_or_path')}' cannot be loaded with eager "
                f"attention, which attention analysis needs to get attention weights: {msg}") from e
        raise


def load_variants(model_cfg: DictConfig, variants: list[Variant],
                  allow_base_mismatch: bool = False) -> dict[str, Backbone]:
    base = load_eager(model_cfg)
    out = {}
    for v in variants:
        if v.adapter is None:
            out[v.name] = base
        else:
            check_adapter(v.adapter, base, allow_base_mismatch)
            out[v.name] = load_eager(model_cfg, v.adapter)
    return out


# --- example texts: bar charts and per-token CSV ------------------------------------------------------

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
    """``result[i][v]``: text ``i`` through variant ``v`` (variants in the order given)."""
    any_backbone = next(iter(backbones.values()))
    tok = any_backbone.tokenizer
    items = tokenize(tok, prompt, texts, max_length, append_eos=False)
    n_special = len(special_prefix(tok))
    labels = [[token_label(tok, i) for i in item.ids] for item in items]
    per_variant = {name: final_token_rows(b, items, heads) for name, b in backbones.items()}
    return [[Example(name, item.ids, labels[i], token_roles(item, n_special), per_variant[name][i], item.truncated)
             for name in backbones] for i, item in enumerate(items)]


def write_tokens_csv(path: Path, examples: list[list[Example]], layers: list[int]) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text_id", "variant", "layer", "position", "token_id", "token", "role", "sink", "weight",
                    "share_of_non_sink"])
        for t, variants in enumerate(examples):
            for ex in variants:
                selected = [(str(layer), ex.rows[layer]) for layer in layers]
                if len(layers) > 1:
                    selected.append((f"mean({','.join(map(str, layers))})", ex.rows[layers].mean(0)))
                for layer, row in selected:
                    rest = row[1:].sum()
                    for pos, (tid, label, role, wgt) in enumerate(zip(ex.ids, ex.labels, ex.roles, row)):
                        w.writerow([t, ex.variant, layer, pos, tid, label, role, int(pos == 0), f"{wgt:.6g}",
                                    "" if pos == 0 or rest == 0 else f"{wgt / rest:.6g}"])


def example_figure(variants: list[Example], *, model: str, prompt: Prompt, layers: list[int], heads: str,
                   n_heads: int | None, text: str):
    """Horizontal bars, tokens top to bottom in reading order, one panel per variant (shared axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = variants[0]
    n_layers = first.rows.shape[0]
    labels, roles = first.labels[1:], first.roles[1:]  # position 0 is the sink: dropped
    n = len(labels)
    y = np.arange(n)
    fig, axes = plt.subplots(1, len(variants), sharey=True, sharex=True, squeeze=False,
                             figsize=(2.2 + 3.9 * len(variants), max(3.6, 0.26 * n + 2.4)))
    label_size = 10 if n <= 40 else 8 if n <= 70 else 6
    rows = [ex.rows[layers].mean(0) for ex in variants]
    xmax = max(float(r[1:].max()) if n else 0.0 for r in rows) or 1.0
    for ax, ex, row in zip(axes[0], variants, rows):
        vals = row[1:]
        ax.barh(y, vals, color=[COLOURS[r] for r in roles], height=0.8)
        rest = vals.sum()
        text_mass = vals[np.array(roles) == TEXT].sum()
        sink = f"sink (position 0, '{first.labels[0]}'): {row[0]:.3f}, not shown"
        ax.set_title(f"{ex.variant}\non the text's tokens: {text_mass:.3f} ({text_mass / rest:.0%} of non-sink)\n{sink}"
                     if rest > 0 else f"{ex.variant}\n{sink}", fontsize=10)
        if n <= 60:
            for yi, v in zip(y, vals):
                ax.text(v + xmax * 0.01, yi, f"{v:.3f}", va="center", fontsize=max(label_size - 3, 5),
                        color="#333333")
        ax.set_xlim(0, xmax * 1.18)
        ax.set_xlabel(f"attention weight ({heads} over {n_heads or '?'} heads)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    ax0 = axes[0][0]
    ax0.set_yticks(y, labels, fontsize=label_size)
    ax0.set_ylim(n - 0.5, -0.5)  # reading order, top to bottom
    for tick, role in zip(ax0.get_yticklabels(), roles):
        tick.set_color(COLOURS[role] if role != TEXT else "#a04f0c")
    if n:
        ax0.get_yticklabels()[-1].set_fontweight("bold")  # the final token (its own attention included)
    layer_text = layer_description(layers, n_layers)
    template = prompt.template if len(prompt.template) <= 90 else prompt.template[:87] + "..."
    fig.suptitle(f"Final-token attention · {model} · prompt '{prompt.name}' · {layer_text}\n"
                 f"template: {template}", fontsize=11)
    short = text if len(text) <= 80 else text[:77] + "..."
    fig.text(0.5, 0.005, "orange: the text's own tokens · grey: prompt tokens · bold: the final token (its state is "
             f"the 'last' pooling)\ntext: {short}" + (" (truncated)" if first.truncated else ""),
             ha="center", va="bottom", fontsize=8, color="#333333")
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    return fig


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# --- the aggregate over a data set ---------------------------------------------------------------------

@dataclass
class Aggregate:
    task: str
    variant: str
    n_texts: int
    n_truncated: int
    n_skipped: int  # inputs with no position besides the sink
    per_text: list[Shares]
    indices: list[int]  # index of each kept text in the task's texts

    def layer_stats(self) -> dict[str, np.ndarray]:
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


def write_aggregate_csvs(folder: Path, aggs: list[Aggregate], layers: list[int], texts_by_task: dict) -> list[dict]:
    summary = []
    with atomic_write(folder / "aggregate_layers.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "variant", "layer", "n_texts", "text_share", "text_share_sd", "prompt_share",
                    "special_share", "sink_mass", "text_positions"])
        for a in aggs:
            st = a.layer_stats()
            for layer in range(len(st["text_share"])):
                w.writerow([a.task, a.variant, layer, a.n_texts, *(f"{st[k][layer]:.6f}" for k in
                            ("text_share", "text_share_sd", "prompt_share", "special_share", "sink_mass",
                             "text_positions"))])
    with atomic_write(folder / "aggregate.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        cols = ["task", "variant", "layers", "n_texts", "n_truncated", "n_skipped", "text_share",
                "text_share_se", "prompt_share", "special_share", "sink_mass", "text_positions"]
        w.writerow(cols)
        for a in aggs:
            per = np.array([s.text[layers].mean() for s in a.per_text])
            row = {
                "task": a.task, "variant": a.variant, "layers": ",".join(map(str, layers)), "n_texts": a.n_texts,
                "n_truncated": a.n_truncated, "n_skipped": a.n_skipped, "text_share": float(per.mean()),
                "text_share_se": float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0,
                "prompt_share": float(np.mean([s.prompt[layers].mean() for s in a.per_text])),
                "special_share": float(np.mean([s.special[layers].mean() for s in a.per_text])),
                "sink_mass": float(np.mean([s.sink[layers].mean() for s in a.per_text])),
                "text_positions": float(np.mean([s.text_positions for s in a.per_text])),
            }
            w.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.6f}" for c in cols])
            summary.append(row)
    with atomic_write(folder / "aggregate_texts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "variant", "text_index", "text_share", "prompt_share", "sink_mass", "text_positions",
                    "text"])
        for a in aggs:
            texts = texts_by_task[a.task]
            for i, s in zip(a.indices, a.per_text):
                w.writerow([a.task, a.variant, i, f"{s.text[layers].mean():.6f}", f"{s.prompt[layers].mean():.6f}",
                            f"{s.sink[layers].mean():.6f}", f"{s.text_positions:.6f}", texts[i][:200]])
    return summary


def aggregate_figure(aggs: list[Aggregate], *, model: str, prompt: Prompt, layers: list[int], heads: str):
    """Text share per layer: one panel per task, one directly labelled line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(a.task for a in aggs))
    variants = list(dict.fromkeys(a.variant for a in aggs))
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, sharey=True,
                             figsize=(max(8.5, 1.5 + 5.8 * len(tasks)), 5.2))
    for ax, task in zip(axes[0], tasks):
        mine = [a for a in aggs if a.task == task]
        n_layers = len(mine[0].per_text[0].text)
        x = np.arange(n_layers)
        if layers != list(range(n_layers)):
            for layer in layers:
                ax.axvspan(layer - 0.5, layer + 0.5, color="#fff2cc", zorder=0)
        ends = []
        for a in mine:
            st = a.layer_stats()
            se = st["text_share_sd"] / np.sqrt(max(a.n_texts, 1))
            ax.plot(x, st["text_share"], color=colours[a.variant], lw=2, marker="o", ms=3)
            ax.fill_between(x, st["text_share"] - se, st["text_share"] + se, color=colours[a.variant], alpha=0.15,
                            lw=0)
            ends.append([float(st["text_share"][-1]), a.variant, colours[a.variant]])
        uniform = float(mine[0].layer_stats()["text_positions"][0])
        ax.plot([0, n_layers - 1], [uniform, uniform], color="#555555", ls=":", lw=1.2)
        ends.append([uniform, "uniform over tokens", "#555555"])
        ends.sort(key=lambda e: e[0])
        for k in range(1, len(ends)):  # keep the end labels apart
            ends[k][0] = max(ends[k][0], ends[k - 1][0] + 0.045)
        for yv, name, colour in ends:
            ax.text(n_layers - 0.4, yv, name, color=colour, va="center", fontsize=9, fontweight="bold")
        ax.set_xlim(-0.5, n_layers - 1 + max(6, 0.3 * n_layers))
        ax.set_xticks(sorted({*range(0, n_layers, 5), n_layers - 1}))
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer (0 = first)")
        ax.set_title(f"{task} · {mine[0].n_texts} texts", fontsize=10)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_ylabel("share on the text's own tokens\n(of the non-sink attention)")
    sel = "" if len(layers) == n_layers else " · shaded: selected layers"
    fig.suptitle(f"Share of the final token's attention on the text's own tokens vs the prompt's\n"
                 f"{model} · prompt '{prompt.name}' · {heads} over heads · sink (position 0) excluded\n"
                 f"band: ±1 standard error over texts · dotted: the text's share of the positions (uniform "
                 f"attention){sel}", fontsize=10)
    fig.tight_layout()
    return fig


# --- the whole run ---------------------------------------------------------------------------------------

def _as_texts(spec) -> list[str]:
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not all(isinstance(t, str) for t in spec):
        raise EmbedkitError(f"attention.texts must be a list of strings, got {spec!r}")
    empty = [i for i, t in enumerate(spec) if not t.strip()]
    if empty:
        raise EmbedkitError(f"attention.texts: text {empty[0]} is empty; give example sentences")
    return spec


def _instantiate(node):
    """Hydra's instantiate, with our own errors re-raised as they are (not wrapped)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise


def run_attention(cfg: DictConfig, out_dir: Path) -> dict:
    """Validate the config, then analyse examples and the data set; returns what summary.json holds."""
    from embedkit.runtime import seed_everything, versions
    from embedkit.schema import check_writable

    t0 = time.perf_counter()
    a = cfg.attention
    seed_everything(cfg.seed)
    prompt = _instantiate(cfg.prompt)
    heads = str(a.heads)
    if heads not in HEAD_REDUCTIONS:
        raise EmbedkitError(f"attention.heads must be one of {', '.join(HEAD_REDUCTIONS)}, got {heads!r}")
    check_layer_spec(a.layers)
    texts = _as_texts(a.texts)
    n_texts = int(a.n_texts or 0)
    if n_texts < 0:
        raise EmbedkitError(f"attention.n_texts must be >= 0 (0 = no aggregate), got {n_texts}")
    if not texts and not n_texts:
        raise EmbedkitError("nothing to analyse: attention.texts is empty and attention.n_texts=0")
    max_length = int(a.max_length)
    if max_length < 1:
        raise EmbedkitError(f"attention.max_length must be >= 1, got {max_length}")
    variants = parse_variants(a.variants, cfg.model.get("adapter"))
    sets = []
    if n_texts:
        sets = [s.subsample(n_texts, cfg.seed) for s in _instantiate(cfg.data)]
    check_writable(out_dir)
    model_cfg = cfg.model.copy()
    OmegaConf.set_struct(model_cfg, False)
    model_cfg.adapter = None
    backbones = load_variants(model_cfg, variants, bool(a.get("allow_base_mismatch", False)))
    base = next(iter(backbones.values()))
    model_name = base.name
    n_layers = base.model.config.num_hidden_layers
    n_heads = getattr(base.model.config, "num_attention_heads", None)
    layers = parse_layers(a.layers, n_layers)
    t_load = time.perf_counter()

    files = []
    examples_out = []
    if texts:
        examples = run_examples(backbones, prompt, texts, heads, max_length)
        write_tokens_csv(out_dir / "tokens.csv", examples, layers)
        files.append("tokens.csv")
        for i, (text, per_variant) in enumerate(zip(texts, examples)):
            fig = example_figure(per_variant, model=model_name, prompt=prompt, layers=layers, heads=heads,
                                 n_heads=n_heads, text=text)
            save_figure(fig, out_dir / f"example_{i}.png")
            files.append(f"example_{i}.png")
            for ex in per_variant:
                st = shares(ex.rows, ex.roles)
                examples_out.append({
                    "text_id": i, "text": text, "variant": ex.variant, "n_tokens": len(ex.ids),
                    "truncated": ex.truncated, "sink_token": ex.labels[0],
                    "sink_mass": float(st.sink[layers].mean()), "text_share": float(st.text[layers].mean()),
                    "text_mass": float(ex.rows[layers][:, 1:][:, np.array(ex.roles[1:]) == TEXT].sum(1).mean()),
                })
    t_examples = time.perf_counter()

    aggregate = []
    if sets:
        aggs = []
        for s in sets:
            aggs += run_aggregate(backbones, prompt, s.name, s.texts, heads, max_length)
        aggregate = write_aggregate_csvs(out_dir, aggs, layers, {s.name: s.texts for s in sets})
        save_figure(aggregate_figure(aggs, model=model_name, prompt=prompt, layers=layers, heads=heads),
                    out_dir / "aggregate_layers.png")
        files += ["aggregate.csv", "aggregate_layers.csv", "aggregate_texts.csv", "aggregate_layers.png"]

    summary = {
        "model": model_name, "model_source": base.source, "dtype": str(base.dtype).removeprefix("torch."),
        "prompt": prompt.name, "prompt_template": prompt.template,
        "variants": [{"name": v.name, "adapter": v.adapter} for v in variants],
        "layers": layers, "n_layers": n_layers, "heads": heads, "n_heads": n_heads,
        "final_token": "the prompt's last token, no EOS appended (the state behind 'last' pooling)",
        "sink": "position 0 (" + ("BOS" if special_prefix(base.tokenizer) else "first input token: no BOS") + ")",
        "max_length": max_length, "examples": examples_out, "aggregate": aggregate,
        "tasks": {s.name: {"n_texts": len(s.texts), "source": s.source, **s.notes} for s in sets},
        "files": files, "out_dir": str(out_dir),
        "timings": {"load_s": round(t_load - t0, 2), "examples_s": round(t_examples - t_load, 2),
                    "aggregate_s": round(time.perf_counter() - t_examples, 2),
                    "total_s": round(time.perf_counter() - t0, 2)},
        "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "summary.json", summary)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"attention analysis: {summary['model']}, prompt '{summary['prompt']}', "
          f"{layer_description(summary['layers'], summary['n_layers'])}, {summary['heads']} over heads")
    for ex in summary["examples"]:
        print(f"  example {ex['text_id']} [{ex['variant']}]: text share {ex['text_share']:.3f} of non-sink "
              f"(text mass {ex['text_mass']:.3f}, sink {ex['sink_mass']:.3f})")
    for row in summary["aggregate"]:
        print(f"  {row['task']} [{row['variant']}]: text share {row['text_share']:.3f} ± {row['text_share_se']:.3f} "
              f"over {row['n_texts']} texts (uniform would give {row['text_positions']:.3f}; sink "
              f"{row['sink_mass']:.3f})")
    print(f"  written to {summary['out_dir']}: {', '.join(summary['files'])}")


@hydra.main(version_base="1.3", config_path="pkg://embedkit.conf", config_name="attention")
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    quiet_libraries()
    out_dir = Path(cfg.attention.output_dir or HydraConfig.get().runtime.output_dir)
    with user_errors_as_messages("embedkit-attention"):
        run_attention(cfg, out_dir)


def main() -> None:
    with interrupts_as_messages("embedkit-attention", "nothing is resumed; re-run the same command"):
        _app()


if __name__ == "__main__":
    main()
