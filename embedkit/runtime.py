"""What every command records and sets up about the process it runs in: package versions, the git
commit of the code, the seeds of Python, NumPy and torch, and the process's memory (now and at its peak)."""

from __future__ import annotations

import importlib.metadata
import platform
import random
import resource
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["git_commit", "memory_gib", "reset_peak_memory", "seed_everything", "versions"]

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


def memory_gib(device: torch.device, peak: bool = False) -> float:
    """Memory of this process in GiB, rounded to 3 digits: on CUDA what is allocated on ``device`` now
    (``peak=True``: the most since the last ``torch.cuda.reset_peak_memory_stats``); on CPU the peak RSS
    either way (Linux: since the last ``reset_peak_memory``, else since the process started)."""
    if device.type == "cuda":
        b = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
        return round(b / 2**30, 3)
    try:  # VmHWM: the peak RSS, which reset_peak_memory can reset (ru_maxrss cannot)
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 2**20, 3)  # KiB -> GiB


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak of ``memory_gib(device, peak=True)`` afresh, so the training loop's peak does not carry
    the evaluation before it: ``torch.cuda.reset_peak_memory_stats`` on CUDA; on Linux the process's peak
    RSS (``echo 5 > /proc/self/clear_refs``); elsewhere nothing (the peak then counts from the start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
