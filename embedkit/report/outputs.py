"""The report files: ``report`` writes the generic pivot (``report.md``, ``report.csv``, ``report.png``),
``table_report`` one paper table (``table-NAME.md/.csv/.png`` and ``report.csv``); ``report.csv`` has one
row per run. ``log_report`` (``embedkit-report --wandb``) logs a report as one W&B run beside the runs."""

from __future__ import annotations

import csv
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.loggers import WandbLogger, results_table, started
from embedkit.report.figures import heatmap
from embedkit.report.results import is_peer, load_references, load_results, scan, select_models, untuned
from embedkit.report.tables import BUILDERS, TABLES, finetune_details, peer_details, pivot, to_markdown


def write_runs_csv(path: Path, results: list[dict]) -> None:
    """One row per run: configuration, mean (before), per-task scores, where scores came from; returns None."""
    tasks = sorted({t for r in results for t in r["scores"]})
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "prompt", "pooling", "train", "mean", "mean_before", *tasks, "from_cache", "run_dir"])
        for r in results:
            w.writerow([r["model"], r["prompt"], r["pooling"], r.get("config", {}).get("train", {}).get("name", ""),
                        f"{r['mean']:.6f}", f"{r['mean_before']:.6f}" if "mean_before" in r else "",
                        *(f"{r['scores'][t]:.6f}" if t in r["scores"] else "" for t in tasks),
                        len(r.get("from_cache", {}).get("scores", [])), r.get("run_dir", "")])


def output_folder(out: str | None, folders: list[str]) -> Path:
    """Where the report files go: ``out`` if given, else the first of ``folders`` (its folder if a file)."""
    out_dir = Path(out or folders[0])
    return out_dir.parent if out_dir.is_file() else out_dir


def report(folders: list[str], rows: str = "prompt", cols: str = "pooling", value: str = "mean",
           out: str | None = None, plot: bool = True, models: list[str] | None = None) -> str:
    """The pivot table of the untuned LLM runs (plus a before/after table of fine-tuned runs, and peers'
    rows beside the LLMs' best configurations when there are peer runs).

    Reads the results under ``folders`` (only ``models``' if given), writes ``report.md``, ``report.csv``
    and, with ``plot`` and more than one cell, ``report.png`` into ``output_folder(out, folders)``; returns
    the markdown."""
    everything = select_models(load_results(folders), models, folders)
    results = untuned(everything) or everything
    results = [r for r in results if not is_peer(r)] or results  # peers: their own rows below (peer_details)
    row_keys, col_keys, cells = pivot(results, rows, cols, value)
    model_names = sorted({r["model"] for r in results})
    tasks = sorted({t for r in results for t in r["scores"]})
    what = "mean V-measure" if value == "mean" else f"V-measure on {value}"
    title = f"{what} x100, {', '.join(model_names)}, tasks: {', '.join(tasks)}"
    md = to_markdown(title, rows, row_keys, col_keys, cells)
    for section in (finetune_details(everything), peer_details(everything)):
        if section:
            md += "\n" + section
    out_dir = output_folder(out, folders)
    with atomic_write(out_dir / "report.md", "w", encoding="utf-8") as f:
        f.write(md)
    write_runs_csv(out_dir / "report.csv", everything)
    if plot and len(cells) > 1:
        heatmap(out_dir / "report.png", title, rows, cols, row_keys, col_keys, cells)
    return md


def table_report(folders: list[str], table: str, out: str | None = None, plot: bool = True,
                 models: list[str] | None = None) -> tuple[str, list[Path]]:
    """One paper table (``pooling``, ``prompts``, ``finetune``, ``reference``) as Markdown, CSV and PNG.

    Reads the results under ``folders`` (only ``models``' if given); returns (the markdown, the files
    written into ``output_folder(out, folders)``)."""
    if table not in BUILDERS:
        raise EmbedkitError(f"--table {table}: choose one of {', '.join(TABLES)}")
    results = select_models(load_results(folders), models, folders)
    t = BUILDERS[table](results, load_references())
    md = t.markdown()
    out_dir = output_folder(out, folders)
    written = [out_dir / f"table-{table}.md", out_dir / f"table-{table}.csv", out_dir / "report.csv"]
    with atomic_write(written[0], "w", encoding="utf-8") as f:
        f.write(md)
    t.write_csv(written[1])
    write_runs_csv(written[2], results)
    if plot and t.heat and len(t.heat[5]) > 1:
        heatmap(out_dir / f"table-{table}.png", *t.heat)
        written.append(out_dir / f"table-{table}.png")
    if plot and hasattr(t, "line_plot") and t.line_plot(out_dir / f"table-{table}.png"):  # levers: V per block
        written.append(out_dir / f"table-{table}.png")
    return md, written


def csv_tables(path: Path) -> dict[str, tuple[list[str], list[list[str]]]]:
    """A report CSV as (header, rows) tables: one, keyed by the file's stem, or for the levers table one
    per section (each starts with a header whose first cell is ``section``), keyed ``<stem>/<n>``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    starts = [i for i, row in enumerate(rows) if row and row[0] == "section"] or [0]
    return {path.stem if len(starts) == 1 else f"{path.stem}/{n}": (rows[a], rows[a + 1:b])
            for n, (a, b) in enumerate(zip(starts, [*starts[1:], len(rows)]), 1) if a < len(rows)}


def report_logger(results: list[dict]) -> WandbLogger:
    """A W&B logger with the runs' own ``logger=wandb`` settings (project, entity, mode, group, tags; the
    first run's that has them), else the defaults (project ``embedkit``, online only with ``WANDB_API_KEY``)."""
    nodes = [node for r in results if isinstance(node := (r.get("config") or {}).get("logger"), dict)
             and str(node.get("_target_", "")).endswith("WandbLogger")]
    return WandbLogger(**{k: v for k, v in (nodes[0] if nodes else {}).items()
                          if k in ("project", "entity", "mode", "group", "tags")})


def log_report(folders: list[str], out_dir: Path, images: list[Path], models: list[str] | None = None,
               table: str | None = None) -> str:
    """Log a written report as one W&B run (``job_type=report``, named ``report`` or ``table-NAME``) in the
    runs' group when they share one, tagged with their experiments' tags and models: ``runs`` (one row per
    run and task, from ``results_table``), the paper table's CSV (``table-NAME``) and ``images`` (the heat
    map, the levers layer plot) under their file stems. Returns a line saying where the run went."""
    results = select_models(scan(folders)[0], models, folders)
    groups = sorted({r["sweep"] for r in results if r.get("sweep")})
    group = groups[0] if len(groups) == 1 else None
    tags = [*dict.fromkeys(t for r in results for t in (r.get("config") or {}).get("tags") or []),
            *sorted({r["model"] for r in results})]
    name = f"table-{table}" if table else "report"
    logger = report_logger(results)
    config = {"folders": [str(f) for f in folders], "table": table, "models": models, "runs": len(results)}
    with started(logger, config, name, group, "report", out_dir, tags):
        logger.table("runs", *results_table(results, with_run=True))
        if table:
            for key, (columns, rows) in csv_tables(out_dir / f"table-{table}.csv").items():
                logger.table(key, columns, rows)
        logger.images({Path(p).stem: p for p in images})
        logger.summary({"runs": len(results), "sweeps": len(groups)})
    where = f"group {logger.group or group}" if logger.group or group else f"no group ({len(groups)} sweeps)"
    return f"W&B: run '{name}' (job_type report) in {where}: {logger.location}"
