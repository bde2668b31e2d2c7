"""Run loggers: Weights & Biases (default, offline without an API key), a local CSV, or nothing.

All share one small interface used by ``embedkit.run``, ``embedkit-report --wandb`` and ``embedkit-attention``:
``start``, ``log`` (time series such as training curves), ``summary`` (final scores), ``table``, ``images``
(PNG files written by the report and the attention analysis) and ``finish`` (always called, also on errors:
``started``). ``results_table`` turns results.json dicts into the score table both the run and the report log.
"""

from __future__ import annotations

import contextlib
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


def results_table(results: list[dict], with_run: bool = False) -> tuple[list[str], list[list]]:
    """(columns, rows) of one row per run and task: ``task``, ``v_measure`` (and ``v_measure_before`` when a
    run was fine-tuned), ``model``, ``prompt``, ``pooling``, ``layer``, ``span``, ``train``; ``with_run``
    puts the run folder's name and its sweep first (the report's table of many runs)."""
    dicts = []
    for r in results:
        spec, train = r.get("pooling_spec") or {}, (r.get("config") or {}).get("train") or {}
        for task, score in r["scores"].items():
            row = {"run": Path(r.get("run_dir", "")).name, "sweep": r.get("sweep")} if with_run else {}
            row |= {"task": task, "v_measure": score}
            if "scores_before" in r:
                row["v_measure_before"] = r["scores_before"].get(task)
            row |= {"model": r["model"], "prompt": r["prompt"], "pooling": r["pooling"], "layer": spec.get("layer"),
                    "span": spec.get("span"), "train": train.get("name", "none")}
            dicts.append(row)
    present = {k for row in dicts for k in row}
    columns = [c for c in ("run", "sweep", "task", "v_measure", "v_measure_before", "model", "prompt", "pooling",
                           "layer", "span", "train") if c in present]
    return columns, [[row.get(c) for c in columns] for row in dicts]


class NullLogger:
    """The logger interface (``logger=none``): every method does nothing; the others override them.
    ``location`` says where the last started run went (empty: nowhere to point at)."""

    location = ""

    def start(self, config: dict, name: str, group: str | None, job_type: str, run_dir: Path,
              tags: list[str] | None = None) -> None:
        """Begin a run: its resolved config, name, group (experiment/sweep time), job type (eval, train,
        report, attention), folder and tags (the experiment's, the model)."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        """A time-series point (e.g. training loss) at ``step``."""

    def summary(self, metrics: dict) -> None:
        """Final metrics of the run (nested dicts are flattened with dots)."""

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A table of ``rows`` under ``columns`` (scores per task, the loss curve)."""

    def images(self, paths: dict[str, Path | str]) -> None:
        """Image files (PNG) under their names, e.g. ``{"report": out / "report.png"}``."""

    def finish(self, failed: bool = False) -> None:
        """End the run, marked failed when a step raised."""


class CSVLogger(NullLogger):
    """Appends one row per finished run (flattened config + summary metrics) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.row: dict[str, Any] = {}

    def start(self, config, name, group, job_type, run_dir, tags=None) -> None:
        """Start this run's row with its flattened config (whose ``tags`` key holds the experiment's)."""
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
    summary metrics, tables, images; the jobs of a sweep share a ``group``. ``mode=auto`` is online
    when ``WANDB_API_KEY`` is set, else offline (``wandb sync`` later). The key is never written out.
    ``location``: the last started run's URL, or its offline folder and the command that uploads it."""

    def __init__(self, project: str = "embedkit", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags or [])
        self.mode = ("online" if os.environ.get("WANDB_API_KEY") else "offline") if mode == "auto" else mode
        self.run = None

    def start(self, config, name, group, job_type, run_dir, tags=None) -> None:
        """``wandb.init`` with the flattened config, online or offline as configured; the configured
        ``group`` and ``tags`` come before the run's (W&B keeps tags of at most 64 characters)."""
        import wandb

        tags = [str(t)[:64] for t in dict.fromkeys([*self.tags, *(tags or [])]) if str(t)]
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, name=name,
                              group=self.group or group, job_type=job_type, tags=tags,
                              config=flatten(config), dir=str(run_dir), reinit="finish_previous")
        if self.mode == "offline":
            folder = Path(self.run.dir).parent
            self.location = f"offline run {folder} (upload: wandb sync {folder})"
            log.info("W&B %s", self.location)
        else:
            self.location = self.run.url or ""

    def log(self, metrics: dict, step: int | None = None) -> None:
        """``run.log(metrics, step)``."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        """Set the flattened metrics as the run's summary."""
        if self.run is not None:
            self.run.summary.update(flatten(metrics))

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """Log ``rows`` as a ``wandb.Table``; a column whose values mix types (a layer that is a number in
        one run and a list in another) is logged as text, which W&B requires."""
        if self.run is not None:
            import wandb

            def kind(v):
                return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v)

            mixed = {i for i in range(len(columns)) if len({kind(r[i]) for r in rows if r[i] is not None}) > 1}
            rows = [[str(v) if i in mixed and v is not None else v for i, v in enumerate(r)] for r in rows]
            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def images(self, paths: dict[str, Path | str]) -> None:
        """Log each file as a ``wandb.Image`` (the dashboard's media panels), all in one step."""
        if self.run is not None and paths:
            import wandb

            self.run.log({name: wandb.Image(str(path)) for name, path in paths.items()})

    def finish(self, failed: bool = False) -> None:
        """Finish the W&B run with exit code 1 when it failed."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


@contextlib.contextmanager
def started(logger: NullLogger, config: dict, name: str, group: str | None, job_type: str, run_dir: Path,
            tags: list[str] | None = None):
    """``logger`` started with these arguments and yielded; always finished, marked failed when the block
    raises."""
    logger.start(config, name=name, group=group, job_type=job_type, run_dir=run_dir, tags=tags)
    failed = True
    try:
        yield logger
        failed = False
    finally:
        logger.finish(failed=failed)
