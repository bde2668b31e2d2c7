"""The report files: ``report`` writes the generic pivot (``report.md``, ``report.csv``, ``report.png``),
``table_report`` one paper table (``table-NAME.md/.csv/.png`` and ``report.csv``); ``report.csv`` has one
row per run."""

from __future__ import annotations

import csv
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.report.figures import heatmap
from embedkit.report.results import is_peer, load_references, load_results, select_models, untuned
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
