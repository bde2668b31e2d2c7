"""The ``embedkit`` command: a Hydra app over ``conf/`` (``embedkit --help`` lists the groups).

    embedkit prompt=eol pooling=last                      # one configuration
    embedkit -m prompt=none,eol,cluster pooling=mean,last # a sweep: one results.json per job
    embedkit data=jsonl data.root=/path/to/folder         # your own JSONL clustering sets

Input errors print one message on stderr (no traceback) and exit with code 2; config errors are found
before Hydra creates a run folder (``embedkit.schema``). Ctrl-C exits with 130, SIGTERM with 143, both
after the same cleanup (no partial files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

# Offline by default: hub calls would only wait for a network that may not be there. Users with
# internet who want hub models/tasks set EMBEDKIT_ONLINE=1.
if os.environ.get("EMBEDKIT_ONLINE") != "1":
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from embedkit.errors import EmbedkitError, interrupts_as_messages  # noqa: E402

log = logging.getLogger("embedkit")

_QUIET = ("mteb", "datasets", "transformers", "httpx", "urllib3", "sklearn", "wandb", "huggingface_hub")


def quiet_libraries() -> None:
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


@hydra.main(version_base="1.3", config_path="pkg://embedkit.conf", config_name="config")
def _app(cfg: DictConfig) -> float | None:
    quiet_libraries()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
    from embedkit.run import run
    from embedkit.train.trainer import init_distributed

    init_distributed()  # under torchrun: join the process group before any model work

    with user_errors_as_messages("embedkit"):
        return run(cfg, run_dir, group, job=hc.job.num if hc.mode.name == "MULTIRUN" else 0)["mean"]


def find_user_error(e: BaseException | None) -> EmbedkitError | None:
    """The ``EmbedkitError`` behind ``e``, also when Hydra's ``instantiate`` wrapped it."""
    while e is not None:
        if isinstance(e, EmbedkitError):
            return e
        e = e.__cause__ or e.__context__
    return None


def main() -> None:
    with interrupts_as_messages("embedkit", "re-run the same command to resume (finished sweep jobs are "
                                "skipped with eval.cache=true; train.resume=true continues training)"):
        with user_errors_as_messages("embedkit"):
            from embedkit.schema import precheck

            precheck(sys.argv[1:])  # config errors before Hydra makes a run folder
        _app()


if __name__ == "__main__":
    main()
