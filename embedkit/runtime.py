"""What every command records and sets up about the process it runs in: package versions, the git
commit of the code, and the seeds of Python, NumPy and torch."""

from __future__ import annotations

import importlib.metadata
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["git_commit", "seed_everything", "versions"]

_PACKAGES = ("embedkit", "torch", "transformers", "peft", "mteb", "datasets", "hydra-core", "wandb",
             "scikit-learn", "numpy", "sentence-transformers")


def versions() -> dict[str, str | None]:
    """Python's version and those of the packages a result depends on (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the installed embedkit source tree, or None outside a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
