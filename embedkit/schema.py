"""Config validation before any model work: every mistake in a config is one message naming the key,
the value and what is allowed.

Three layers, all cheap (no model, no data):

1. **Composition** (Hydra): an unknown group option (``pooling=meen``), an unknown key
   (``encode.max_lenght=64``) or an override that does not parse. ``precheck`` composes the command
   line's configuration itself before Hydra starts the app, so these become one line with the
   available options or keys (and a "did you mean") instead of Hydra's multi-line report, and no run
   folder is created for a config that cannot run.
2. **Types and ranges of the fixed sections**: ``encode`` (``embedkit.embed.encoder.EncodeConfig``) and ``train``
   (``embedkit.train.TrainConfig``) are dataclasses; the composed values are merged into
   ``OmegaConf.structured(...)`` of them, so OmegaConf checks every type (``encode.batch_size=x``), and
   the range rules (field metadata here, ``TrainConfig.__post_init__`` there) check the values
   (``encode.max_length=0``, ``encode.packing=maybe``, ``train.max_steps=-1``, ``train.temperature=0``).
3. **Every ``_target_`` node** (model, prompt, pooling, data, eval, logger, pairs, augmentation,
   optimizer): each key must be a parameter of the class or function it instantiates, and a scalar
   whose parameter is annotated ``int``/``float``/``bool``/``str`` must have that type
   (``optimizer.lr=abc`` against ``torch.optim.AdamW(lr: float | Tensor)``). Required values left at
   ``???`` (``data.root``) are named too.

Values that depend on the data or the model (a LoRA target module the model lacks, ``train.batch_size``
larger than the pair set) are checked where those are known, still before training starts.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from embedkit.errors import EmbedkitError
from embedkit.io import check_writable


_TARGET_GROUPS = ("model", "prompt", "pooling", "data", "eval", "logger", "pairs", "augmentation", "optimizer")
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def validate(cfg: DictConfig) -> None:
    """Raise ``EmbedkitError`` for the first problem in a composed main config (see the module doc)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise EmbedkitError(f"{missing[0]} is required but not set (it is ???); give it on the command line, "
                            f"e.g. {missing[0]}=..." + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else ""))
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise EmbedkitError(f"seed={seed!r}: expected an integer (e.g. seed=0)")
    # imported here, not at the top: they load torch, and the command line's composition errors and
    # --help (precheck, before any config is validated) should answer in a fraction of a second
    from embedkit.embed.encoder import EncodeConfig
    from embedkit.embed.models import check_name_or_path
    from embedkit.embed.peer import check_peer_config, is_peer_config
    from embedkit.train.config import TrainConfig

    peer = is_peer_config(cfg.get("model"))
    if peer:  # a sentence-transformers peer: no fine-tuning, a folder with modules.json (before the train checks)
        check_peer_config(cfg.model, train=cfg.train.name)
    check_section("encode", cfg.encode, EncodeConfig)
    if cfg.train.name != "none":
        check_section("train", cfg.train, TrainConfig)
    for group in _TARGET_GROUPS:
        if group in cfg and cfg[group] is not None:
            check_targets(group, cfg[group])
    name_or_path = OmegaConf.select(cfg, "model.name_or_path", default=None, throw_on_resolution_failure=False)
    if isinstance(name_or_path, str) and name_or_path and not peer:
        check_name_or_path(name_or_path)  # a folder that is not a model: named before any work
    check_objective(cfg.get("optimized_metric"), training=cfg.train.name != "none")


def check_objective(metric, training: bool, tasks: list[str] | None = None) -> None:
    """``optimized_metric`` (what a run returns to a sweeper, e.g. Optuna's) names a number of ``results.json``:
    ``mean``, ``mean_before`` (fine-tuning runs) or ``scores.<task>``, a task of the run when ``tasks`` is given."""
    if metric is None or metric == "mean":
        return
    if metric == "mean_before" and training:
        return
    task = metric[len("scores."):] if isinstance(metric, str) and metric.startswith("scores.") else None
    if task and (tasks is None or task in tasks):
        return
    hint = f"; this run's tasks are {', '.join(tasks)}{_did_you_mean(task, tasks)}" if task and tasks else ""
    raise EmbedkitError(f"optimized_metric={metric!r}: expected mean, scores.<task>"
                        f"{' or mean_before' if training else ' (mean_before needs train=lora)'}{hint}")


def check_section(prefix: str, node: DictConfig, schema: type) -> object:
    """Merge ``node`` into the structured schema (types, unknown keys), then check the range metadata;
    returns the schema instance (which runs the dataclass' own ``__post_init__`` checks)."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        raise EmbedkitError(_omegaconf_message(prefix, node, schema, e)) from None
    for f in fields(schema):
        lo = f.metadata.get("min")
        value = typed[f.name]
        if lo is not None and value is not None and value < lo:
            raise EmbedkitError(f"{prefix}.{f.name}={value}: must be >= {lo}")
        choices = f.metadata.get("choices")  # strings; a true/false given for one arrives as "True"/"False"
        if choices is not None and str(value).lower() not in choices:
            raise EmbedkitError(f"{prefix}.{f.name}={value!r}: choose one of {', '.join(choices)}")
    return OmegaConf.to_object(typed)


def _omegaconf_message(prefix: str, node, schema: type, e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    names = [f.name for f in fields(schema)]
    if key not in names:  # unknown key (added with +key=...)
        return f"{prefix}.{key}: unknown key; {prefix} has {', '.join(names)}{_did_you_mean(str(key), names)}"
    hint = typing.get_type_hints(schema).get(key)
    value = OmegaConf.to_container(node, resolve=True).get(key) if isinstance(node, DictConfig) else None
    return f"{prefix}.{key}={value!r}: expected {_type_name(hint)}"


def _type_name(hint) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# --- _target_ nodes -------------------------------------------------------------------------------------

def check_targets(prefix: str, node) -> None:
    """Check ``node`` (and nested ``_target_`` nodes, e.g. ``augmentation.methods.*``) against the
    signatures of their targets."""
    if not isinstance(node, DictConfig):
        return
    target_path = node.get("_target_")
    if target_path is not None:
        _check_call(prefix, node, target_path)
    for key in node:
        if isinstance(key, str) and not key.startswith("_"):
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                check_targets(f"{prefix}.{key}", child)


def _check_call(prefix: str, node: DictConfig, target_path: str) -> None:
    from hydra.utils import get_object

    try:
        target = get_object(target_path)
    except Exception as e:  # noqa: BLE001 (import errors of any kind: the message names the target)
        raise EmbedkitError(f"{prefix}._target_={target_path!r} cannot be imported ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 (annotations that do not evaluate: check names only)
        hints = {}
    for key in node:
        if not isinstance(key, str) or key in _HYDRA_KEYS:
            continue
        if key not in params:
            if open_kwargs:
                continue
            raise EmbedkitError(f"{prefix}.{key}: unknown setting for {target_path}; its settings are "
                                f"{', '.join(params)}{_did_you_mean(key, params)}")
        if OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue  # an interpolation that only resolves inside the app (e.g. ${hydra:...})
        expected = _scalar_types(hints.get(key))
        if expected and not _matches(value, expected):
            raise EmbedkitError(f"{prefix}.{key}={value!r}: expected {' or '.join(sorted(_names(expected)))} "
                                f"({target_path} takes {key}: {_hint_text(hints.get(key))})")


_SCALARS = (int, float, bool, str)


def _scalar_types(hint) -> set[type] | None:
    """The scalar types a parameter accepts, or None when its annotation is not a plain scalar one
    (a list, a dict, a class: not checked here). ``None`` values are always accepted: defaults of
    ``null`` are common and the target checks them itself."""
    if hint is None:
        return None
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out = set()
    for m in members:
        if m is type(None):
            continue
        if m in _SCALARS:
            out.add(m)
        elif getattr(m, "__name__", "") == "Tensor":  # torch.optim: lr: float | Tensor
            continue
        else:
            return None
    return out or None


def _matches(value, expected: set[type]) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int):
        return bool(expected & {int, float})
    if isinstance(value, float):
        return float in expected
    if isinstance(value, str):
        return str in expected
    return False  # a list or a dict where a scalar is expected


def _names(expected: set[type]) -> set[str]:
    return {_type_name(t) for t in expected}


def _hint_text(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


# --- resources ------------------------------------------------------------------------------------------

# --- the command line, before Hydra starts the app -------------------------------------------------------

_PASS_THROUGH_FLAGS = {"-m", "--multirun"}


def precheck(argv: list[str], config_name: str = "config") -> None:
    """Compose the configuration(s) the command line asks for and validate them, before Hydra creates a
    run folder. A sweep (``-m a=1,2 b=x,y``) is checked one value at a time (each value with the first
    value of every other sweep). Command lines with other Hydra flags (``--help``, ``--cfg``, ...)
    are left to Hydra."""
    if any(a.startswith("-") and a not in _PASS_THROUGH_FLAGS for a in argv):
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [a for a in argv if a not in _PASS_THROUGH_FLAGS]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise EmbedkitError(f"cannot parse the command line: {_first_line(e)}") from None
    multirun = any(a in _PASS_THROUGH_FLAGS for a in argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("embedkit.conf", version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            if multirun:  # sweeps a config file declares (hydra.sweeper.params of an experiment) count too
                fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
                first = _compose(compose, loader, config_name, fixed, return_hydra_config=True)
                params = first.hydra.sweeper.get("params")
                declared = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
                given = {o.get_key_element() for o in parsed}
                extra = [f"{k}={v}" for k, v in declared.items() if k not in given]
                if extra:
                    parsed = OverridesParser.create().parse_overrides(extra) + list(parsed)
                _check_storage(first.hydra.sweeper.get("storage"))
            elif any(o.get_key_element() == "hparams_search" and o.value() is not None for o in parsed):
                raise EmbedkitError("hparams_search is a search of many runs: start it with -m (embedkit -m "
                                    "hparams_search=...)")
            for o in parsed:
                o.config_loader = loader  # glob(*) sweeps list the group's options
            combos = _one_value_at_a_time(parsed)
            for combo in combos:
                cfg = _compose(compose, loader, config_name, combo)
                validate(cfg)
            try:
                root = Path(str(cfg.paths.output_root))
                min_free = cfg.paths.get("min_free_mb", 0)
            except OmegaConfBaseException:
                return
            check_writable(root, min_free or 0)
    finally:
        GlobalHydra.instance().clear()


def _check_storage(storage) -> None:
    """The folder of an SQLite study (Optuna's ``hydra.sweeper.storage``) exists and is writable before the
    sweeper opens it (SQLite does not make folders)."""
    if isinstance(storage, str) and storage.startswith("sqlite:///") and ":memory:" not in storage:
        check_writable(Path(storage[len("sqlite:///"):]).parent)


def _one_value_at_a_time(parsed) -> list[list[str]]:
    fixed, sweeps = [], []
    for o in parsed:
        if o.is_interval_sweep():  # a search interval (Optuna's sweeper): both ends are checked
            sweep = o.value()
            sweeps.append([f"{o.get_key_element()}={v}" for v in (sweep.start, sweep.end)])
        elif o.is_sweep_override():
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            sweeps.append(values)
        else:
            fixed.append(o.input_line)
    combos = [fixed + [s[0] for s in sweeps]]
    for i, values in enumerate(sweeps):
        for v in values[1:]:
            combos.append(fixed + [s[0] if j != i else v for j, s in enumerate(sweeps)])
    return combos


def _compose(compose, loader, config_name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except MissingConfigException as e:
        raise EmbedkitError(_missing_option_message(e, loader, overrides)) from None
    except ConfigCompositionException as e:
        raise EmbedkitError(_composition_message(e, compose, config_name, overrides)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise EmbedkitError(f"bad configuration: {_first_line(e)}") from None


def _missing_option_message(e, loader, overrides: list[str]) -> str:
    group = None
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if f"'{key}/{value}'" in str(e) or f"{key}/{value}" in str(e):
            group, bad = key, value
            break
    if group is None:
        return f"bad configuration: {_first_line(e)}"
    options = loader.get_group_options(group.split("@")[0])
    return (f"{group}={bad}: no such option; the {group} options are {', '.join(options)}"
            f"{_did_you_mean(bad, options)}")


def _composition_message(e, compose, config_name: str, overrides: list[str]) -> str:
    cause = e.__cause__ or e.__context__
    key = getattr(cause, "full_key", None)
    if key:
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
        try:
            base = compose(config_name, overrides=rest)
            node = OmegaConf.select(base, parent) if parent else base
        except Exception:  # noqa: BLE001 (the listing is a courtesy; the message stands without it)
            node = None
        if isinstance(node, DictConfig):
            keys = [k for k in node if isinstance(k, str) and k not in _HYDRA_KEYS]
            if leaf not in keys:
                return (f"{key}: unknown key; {parent or 'the config'} has {', '.join(keys)}"
                        f"{_did_you_mean(leaf, keys)} (a new key needs a leading +, e.g. +{key}=...)")
        return f"{key}: {_first_line(cause)}"
    return f"bad configuration: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__

