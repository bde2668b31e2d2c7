"""Run loggers: Weights & Biases (default, offline without an API key), a local CSV, or nothing.

All share one small interface used by ``embedkit.run``: ``start``, ``log`` (time series such as training
curves), ``summary`` (final scores), ``table`` and ``finish`` (always called, also on errors).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from embedkit.io import atomic_write

log = logging.getLogger(__name__)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings so every value is filterable."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


class NullLogger:
    """The logger interface (``logger=none``): every method does nothing; the others override them."""
    def start(self, config: dict, name: str, group: str | None, job_type: str, run_dir: Path) -> None:
        """Begin a run: its resolved config, name, sweep group, job type (eval/train) and folder."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        """A time-series point (e.g. training loss) at ``step``."""

    def summary(self, metrics: dict) -> None:
        """Final metrics of the run (nested dicts are flattened with dots)."""

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A table of ``rows`` under ``columns`` (scores per task, the loss curve)."""

    def finish(self, failed: bool = False) -> None:
        """End the run, marked failed when a step raised."""


class CSVLogger(NullLogger):
    """Appends one row per finished run (flattened config + summary metrics) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.row: dict[str, Any] = {}

    def start(self, config, name, group, job_type, run_dir) -> None:
        """Start this run's row with its flattened config."""
        self.row = {"run": name, "group": group or "", "job_type": job_type, "run_dir": str(run_dir),
                    **flatten(config)}

    def summary(self, metrics: dict) -> None:
        """Add the flattened metrics to this run's row."""
        self.row.update(flatten(metrics))

    def finish(self, failed: bool = False) -> None:
        """Append the row to the CSV (atomically; new columns are added, old rows keep theirs)."""
        if not self.row:
            return
        self.row["failed"] = failed
        rows = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        rows.append({k: "" if v is None else v for k, v in self.row.items()})
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
        self.row = {}


class WandbLogger(NullLogger):
    """W&B run per job: flattened config (filter by ``prompt.name``, ``pooling.name``, ...), scores as
    summary metrics, the result table; the jobs of a sweep share a ``group``. ``mode=auto`` is online
    when ``WANDB_API_KEY`` is set, else offline (``wandb sync`` later). The key is never written out."""

    def __init__(self, project: str = "embedkit", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags or [])
        self.mode = ("online" if os.environ.get("WANDB_API_KEY") else "offline") if mode == "auto" else mode
        self.run = None

    def start(self, config, name, group, job_type, run_dir) -> None:
        """``wandb.init`` with the flattened config, online or offline as configured."""
        import wandb

        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, name=name,
                              group=self.group or group, job_type=job_type, tags=self.tags,
                              config=flatten(config), dir=str(run_dir), reinit="finish_previous")
        if self.mode == "offline":
            log.info("W&B offline run in %s (upload with `wandb sync %s`)", self.run.dir,
                     Path(self.run.dir).parent)

    def log(self, metrics: dict, step: int | None = None) -> None:
        """``run.log(metrics, step)``."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        """Set the flattened metrics as the run's summary."""
        if self.run is not None:
            self.run.summary.update(flatten(metrics))

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """Log ``rows`` as a ``wandb.Table``."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self, failed: bool = False) -> None:
        """Finish the W&B run with exit code 1 when it failed."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
