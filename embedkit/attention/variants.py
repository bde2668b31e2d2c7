"""The model variants compared: ``attention.variants`` specs, checks that an adapter is a saved peft
adapter made for the base model, and loading every variant with eager attention (the only attention
implementation that returns attention weights; the encoder keeps SDPA)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open

from embedkit.embed.models import Backbone
from embedkit.errors import EmbedkitError, find_user_error

# The analysis logged under one name while it was one module; its log lines keep that name.
log = logging.getLogger("embedkit.attention.measure")


@dataclass(frozen=True)
class Variant:
    """One model variant: the base model (``adapter=None``) or the base model with a peft adapter."""

    name: str
    adapter: str | None = None


def parse_variants(spec, model_adapter: str | None = None) -> list[Variant]:
    """``attention.variants``: null (base, plus ``model.adapter`` if set) or a list whose items are
    ``base``/null, an adapter folder, or ``{name, adapter}``.

    Returns the variants in the order given; raises an ``EmbedkitError`` for an unreadable spec, a name
    given twice, or an adapter folder that is missing or not a saved peft adapter."""
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


# --- adapter checks ---------------------------------------------------------------------------------------

def adapter_files(adapter: str) -> tuple[Path, Path]:
    """The (config, weights) files of the saved peft adapter in folder ``adapter``; raises an
    ``EmbedkitError`` where the folder or one of them is missing."""
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


# --- loading ----------------------------------------------------------------------------------------------

def load_eager(model_cfg: DictConfig, adapter: str | None = None) -> Backbone:
    """The backbone of ``model_cfg`` (the ``model`` config group) with eager attention, and with the peft
    adapter in folder ``adapter`` if given; known load failures become an ``EmbedkitError``."""
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
    """Every variant loaded with eager attention: name -> backbone, in the order given (variants without an
    adapter share the one base model). Each adapter is checked against the base model before it is loaded."""
    base = load_eager(model_cfg)
    out = {}
    for v in variants:
        if v.adapter is None:
            out[v.name] = base
        else:
            check_adapter(v.adapter, base, allow_base_mismatch)
            out[v.name] = load_eager(model_cfg, v.adapter)
    return out
