"""One run: config -> build (prompt, pooling, data, evaluator, model) -> encode + evaluate -> results.

Cheap objects are built and validated first, so bad input stops the run before any model work.
``results.json`` is written atomically into the run folder; the logger is always closed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import random
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embedkit.encoder import Encoder
from embedkit.errors import EmbedkitError
from embedkit.io import write_json

log = logging.getLogger(__name__)

_PACKAGES = ("embedkit", "torch", "transformers", "peft", "mteb", "datasets", "hydra-core", "wandb",
             "scikit-learn", "numpy")


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise EmbedkitError(f"cannot write to the output folder {folder}: {e.strerror}; "
                            "set paths.output_root (or hydra.run.dir) to a writable folder") from None


def run(cfg: DictConfig, run_dir: Path, group: str | None = None, job: int = 0) -> dict:
    """Evaluate one configuration; returns the dict written to ``run_dir/results.json``."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    prompt = instantiate(cfg.prompt)
    pooling = instantiate(cfg.pooling)
    evaluator = instantiate(cfg.eval)
    sets = instantiate(cfg.data)
    check_writable(run_dir)
    t_data = time.perf_counter()
    names = f"model={cfg.model.name or cfg.model.name_or_path} prompt={prompt.name} pooling={pooling.name}"
    log.info("run %s on %d task(s): %s", names, len(sets), ", ".join(s.name for s in sets))

    config = OmegaConf.to_container(cfg, resolve=True)
    logger = instantiate(cfg.logger)
    logger.start(config, name=run_dir.name, group=group, job_type="eval", run_dir=run_dir)
    failed = True
    try:
        backbone = instantiate(cfg.model)
        t_model = time.perf_counter()
        encoder = Encoder(backbone, prompt, max_length=cfg.encode.max_length, batch_size=cfg.encode.batch_size,
                          max_tokens=cfg.encode.max_tokens, show_progress=cfg.encode.show_progress,
                          cache_dir=cfg.paths.embedding_cache if cfg.encode.cache else None)
        scores = evaluator.evaluate(encoder, pooling, sets)
        t_eval = time.perf_counter()
        results = {
            "model": backbone.name,
            "model_source": backbone.source,
            "adapter": backbone.adapter,
            "prompt": prompt.name,
            "prompt_template": prompt.template,
            "pooling": pooling.name,
            "scores": scores,
            "mean": float(np.mean(list(scores.values()))),
            "tasks": {s.name: {"n_texts": len(s.texts), "n_labels": s.n_labels, "source": s.source, **s.notes}
                      for s in sets},
            "eval": evaluator.describe(),
            "encode": {"dtype": str(backbone.dtype).removeprefix("torch."), "device": str(backbone.device),
                       "max_length": encoder.max_length, "batch_size": encoder.batch_size,
                       "max_tokens": encoder.max_tokens, "forward_calls": encoder.forward_calls,
                       "texts_encoded": encoder.texts_encoded, "cache_hits": encoder.cache_hits},
            "timings": {"data_s": round(t_data - t0, 3), "model_load_s": round(t_model - t_data, 3),
                        "encode_eval_s": round(t_eval - t_model, 3),
                        "total_s": round(time.perf_counter() - t0, 3)},
            "seed": cfg.seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir),
            "sweep": group,
            "job": job,
            "config": config,
        }
        write_json(run_dir / "results.json", results)
        logger.summary({"scores": scores, "mean": results["mean"], "timings": results["timings"]})
        logger.table("scores", ["task", "v_measure"], [[k, v] for k, v in scores.items()])
        failed = False
    finally:
        logger.finish(failed=failed)
    log.info("%s: mean V-measure %.4f over %d task(s) -> %s", names, results["mean"], len(scores),
             run_dir / "results.json")
    return results
