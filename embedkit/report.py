"""``embedkit-report``: rebuild tables from finished runs' ``results.json`` without running anything.

    embedkit-report outputs/demo/2026-11-25_21-40-00            # prompts x poolings, mean V-measure
    embedkit-report outputs/multirun/... --rows model --cols pooling
    embedkit-report DIR --value twentynewsgroups/test          # one task's score instead of the mean

Writes ``report.md``, ``report.csv`` and ``report.png`` (heat map) into the first folder (or --out)
and prints the table. Scores are V-measure x 100.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from embedkit.io import atomic_write


def load_results(folders: list[str]) -> list[dict]:
    results = []
    for folder in folders:
        base = Path(folder)
        if not base.exists():
            raise SystemExit(f"embedkit-report: error: {folder} does not exist")
        files = [base] if base.is_file() else sorted(base.rglob("results.json"))
        for path in files:
            try:
                results.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                print(f"embedkit-report: skipping {path}: {e}", file=sys.stderr)
    if not results:
        raise SystemExit(f"embedkit-report: error: no results.json under {', '.join(folders)}")
    return sorted(results, key=lambda r: (r.get("sweep") or "", r.get("job", 0), r.get("created", "")))


def _value(result: dict, value: str) -> float | None:
    v = result["mean"] if value == "mean" else result["scores"].get(value)
    return None if v is None else 100 * v


def pivot(results: list[dict], rows: str, cols: str, value: str = "mean"):
    """(row labels, column labels, {(row, col): score x 100}); later runs win on duplicates."""
    row_keys = list(dict.fromkeys(str(r[rows]) for r in results))
    col_keys = list(dict.fromkeys(str(r[cols]) for r in results))
    cells = {}
    for r in results:
        v = _value(r, value)
        if v is not None:
            cells[(str(r[rows]), str(r[cols]))] = v
    return row_keys, col_keys, cells


def to_markdown(title: str, rows: str, row_keys, col_keys, cells) -> str:
    lines = [f"### {title}", "", "| " + " | ".join([rows, *col_keys]) + " |",
             "|" + "---|" * (len(col_keys) + 1)]
    best = max(cells.values()) if cells else None
    for rk in row_keys:
        vals = []
        for ck in col_keys:
            v = cells.get((rk, ck))
            vals.append("" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}"))
        lines.append("| " + " | ".join([rk, *vals]) + " |")
    return "\n".join(lines) + "\n"


def heatmap(path: Path, title: str, rows: str, cols: str, row_keys, col_keys, cells) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[cells.get((r, c), np.nan) for c in col_keys] for r in row_keys])
    fig, ax = plt.subplots(figsize=(1.3 * len(col_keys) + 2.5, 0.6 * len(row_keys) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_keys)), col_keys, rotation=30, ha="right")
    ax.set_yticks(range(len(row_keys)), row_keys)
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i in range(len(row_keys)):
        for j in range(len(col_keys)):
            if not np.isnan(grid[i, j]):
                dark = (grid[i, j] - lo) < 0.5 * (hi - lo)
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="V-measure x 100")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def finetune_table(results: list[dict]) -> str:
    """Before/after rows for runs that fine-tuned (``train=...``)."""
    tuned = [r for r in results if "train" in r]
    if not tuned:
        return ""
    lines = ["### fine-tuning: mean V-measure x100 before -> after", "",
             "| model | prompt | pooling | pairs | steps x batch | negatives | before | after | change | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tuned:
        t = r["train"]
        before, after = 100 * r["mean_before"], 100 * r["mean"]
        lines.append(f"| {r['model']} | {r['prompt']} | {r['pooling']} | {t['pairs']['name']} | "
                     f"{t['steps']} x {t['pairs_seen'] // max(t['steps'], 1)} | {t['negatives_per_loss']}-way | "
                     f"{before:.1f} | {after:.1f} | {after - before:+.1f} | {t['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def report(folders: list[str], rows: str = "prompt", cols: str = "pooling", value: str = "mean",
           out: str | None = None, plot: bool = True) -> str:
    """The pivot table of the untuned runs (plus a before/after table of fine-tuned runs)."""
    everything = load_results(folders)
    results = [r for r in everything if "train" not in r] or everything
    row_keys, col_keys, cells = pivot(results, rows, cols, value)
    models = sorted({r["model"] for r in results})
    tasks = sorted({t for r in results for t in r["scores"]})
    what = "mean V-measure" if value == "mean" else f"V-measure on {value}"
    title = f"{what} x100, {', '.join(models)}, tasks: {', '.join(tasks)}"
    md = to_markdown(title, rows, row_keys, col_keys, cells)
    tuned = finetune_table(everything)
    if tuned:
        md += "\n" + tuned
    out_dir = Path(out or folders[0])
    if out_dir.is_file():
        out_dir = out_dir.parent
    with atomic_write(out_dir / "report.md", "w", encoding="utf-8") as f:
        f.write(md)
    with atomic_write(out_dir / "report.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "prompt", "pooling", "train", "mean", "mean_before", *tasks, "run_dir"])
        for r in everything:
            w.writerow([r["model"], r["prompt"], r["pooling"], r.get("config", {}).get("train", {}).get("name", ""),
                        f"{r['mean']:.6f}", f"{r['mean_before']:.6f}" if "mean_before" in r else "",
                        *(f"{r['scores'][t]:.6f}" if t in r["scores"] else "" for t in tasks), r.get("run_dir", "")])
    if plot and len(cells) > 1:
        heatmap(out_dir / "report.png", title, rows, cols, row_keys, col_keys, cells)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="embedkit-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="run or sweep folders (searched for results.json)")
    p.add_argument("--rows", default="prompt", help="result field for rows (default: prompt)")
    p.add_argument("--cols", default="pooling", help="result field for columns (default: pooling)")
    p.add_argument("--value", default="mean", help="'mean' or a task name (default: mean)")
    p.add_argument("--out", default=None, help="folder for report.md/.csv/.png (default: first folder)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    md = report(args.folders, args.rows, args.cols, args.value, args.out, plot=not args.no_plot)
    out_dir = Path(args.out or args.folders[0])
    print(md)
    print(f"written: {out_dir / 'report.md'}, {out_dir / 'report.csv'}"
          + (f", {out_dir / 'report.png'}" if (out_dir / "report.png").exists() else ""))


if __name__ == "__main__":
    main()
