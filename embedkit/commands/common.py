"""What the console scripts share: offline defaults, quiet third-party logging, and input errors printed
as one line with their exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from embedkit.errors import find_user_error

__all__ = ["offline_by_default", "quiet_libraries", "user_errors_as_messages"]

_QUIET = ("mteb", "datasets", "transformers", "httpx", "urllib3", "sklearn", "wandb", "huggingface_hub",
          "sentence_transformers")


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
