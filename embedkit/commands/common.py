"""What the console scripts share: offline defaults, quiet third-party logging, input errors printed
as one line with their exit code, and the name and group a Hydra job's logger run gets (``run_labels``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from embedkit.errors import find_user_error

__all__ = ["TIME_IN_FOLDER", "offline_by_default", "quiet_libraries", "run_labels", "swept_keys",
           "user_errors_as_messages"]

_QUIET = ("mteb", "datasets", "transformers", "httpx", "urllib3", "sklearn", "wandb", "huggingface_hub",
          "sentence_transformers", "alembic")  # alembic: Optuna's SQLite storage (hparams_search), before any job


def offline_by_default() -> None:
    """Hub calls would only wait for a network that may not be there: offline unless EMBEDKIT_ONLINE=1
    (users with internet who want hub models or tasks set it). Call before transformers is imported."""
    if os.environ.get("EMBEDKIT_ONLINE") != "1":
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


def quiet_libraries() -> None:
    """Third-party loggers at WARNING and no FutureWarnings: the run's own progress stays readable."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextlib.contextmanager
def user_errors_as_messages(prog: str):
    """Input errors (``EmbedkitError``, also wrapped by Hydra) become one line on stderr and their exit
    code; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"{prog}: error: {user_error}", file=sys.stderr)
        sys.exit(user_error.exit_code)


# the ${now:%Y-%m-%d_%H-%M-%S} in the names of the run and sweep folders (conf/config.yaml, the experiments)
TIME_IN_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys a sweep varies: its command-line overrides and ``hydra.sweeper.params`` that hold several
    values (``a,b``, ``range(...)``), read from the ``multirun.yaml`` Hydra's basic sweeper writes at the
    start; None when that file is not there (another sweeper) or cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        master = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml").hydra, resolve=False)
        params = master.get("sweeper", {}).get("params") or {}
        lines = [*master["overrides"]["task"], *(f"{k}={v}" for k, v in params.items())]
        return {o.key_or_group for o in OverridesParser.create().parse_overrides(lines) if o.is_sweep_override()}
    except (OSError, KeyError, AttributeError, OmegaConfBaseException, OverrideParseException):
        return None


def run_labels(hc, default: str) -> tuple[str, str]:
    """(name, group) of a Hydra job's logger run, from its ``HydraConfig`` ``hc``.

    group: the experiment (or Optuna search) name, else ``default``, then the time in the sweep folder (a
    single run: its run folder), e.g. ``table_levers_layers/2026-12-03_15-39-00``; the folder's name when
    it holds no time. name: the job's overrides that vary within the sweep (``pooling.layer=3,pooling=mean``),
    for a single run all of its overrides (``hydra.job.override_dirname``), in both cases without the
    keys of ``hydra.job.config.override_dirname.exclude_keys`` (paths, logger, ...); the run folder's name
    when none is left."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = hc.mode.name == "MULTIRUN"
    folder = Path(hc.sweep.dir if multirun else hc.runtime.output_dir)
    times = TIME_IN_FOLDER.findall(str(folder))
    choices = hc.runtime.choices
    experiment = choices.get("experiment") or choices.get("hparams_search") or default
    group = f"{experiment}/{times[-1] if times else folder.name}"
    name = hc.job.override_dirname
    swept = swept_keys(folder) if multirun else None
    if swept is not None:
        exclude = set(hc.job.config.override_dirname.exclude_keys)
        name = ",".join(sorted(o.input_line for o in OverridesParser.create().parse_overrides(list(hc.overrides.task))
                               if o.key_or_group in swept and o.key_or_group not in exclude))
    return name or Path(hc.runtime.output_dir).name, group
