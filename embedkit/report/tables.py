"""``embedkit-report``: rebuild tables from finished runs' ``results.json`` without running anything.

    embedkit-report outputs/demo/2026-11-25_21-40-00            # prompts x poolings, mean V-measure
    embedkit-report outputs/multirun/... --rows model --cols pooling
    embedkit-report DIR --value twentynewsgroups/test          # one task's score instead of the mean
    embedkit-report outputs/tables/pooling --table pooling     # a paper table, published numbers beside ours
    embedkit-report DIR --table prompts --model llama-3.2-1b   # only this model's runs

Without ``--table`` it writes ``report.md``, ``report.csv`` (one row per run) and ``report.png`` (heat map)
into the first folder (or --out); with ``--table NAME`` it writes ``table-NAME.md/.csv/.png`` and
``report.csv``. Scores are V-measure x 100. Published numbers come from the data files in
``embedkit/report/references/`` (each with its source); a difference is shown only where our runs used the
same task set as the published number. Broken runs (half-written or invalid ``results.json``, missing
fields) are skipped and listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write

TABLES = ("pooling", "prompts", "finetune", "reference")
POOLING_ORDER = ("mean", "last", "eos", "weighted_mean", "concat")


# --- reading runs -------------------------------------------------------------------------------------

def check_result(obj) -> str | None:
    """Why ``obj`` is not a usable results.json (None if it is)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("model", "prompt", "pooling", "scores", "mean") if k not in obj]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if not isinstance(obj["scores"], dict) or not obj["scores"]:
        return "'scores' is not a non-empty object of task -> score"
    bad = [k for k, v in obj["scores"].items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        return f"non-numeric score(s) for {', '.join(bad)}"
    if not isinstance(obj["mean"], (int, float)) or isinstance(obj["mean"], bool):
        return "'mean' is not a number"
    if "train" in obj and not all(k in obj for k in ("mean_before", "scores_before")):
        return "a fine-tuned run without 'mean_before'/'scores_before'"
    return None


def scan(folders: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(valid results sorted by sweep/job/time, [(path, why)] of broken ones)."""
    results, broken = [], []
    for folder in folders:
        base = Path(folder)
        if not base.exists():
            raise EmbedkitError(f"{folder} does not exist; give a run or sweep folder (e.g. outputs/multirun/<time>)")
        files = [base] if base.is_file() else sorted(base.rglob("results.json"))
        for path in files:
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                broken.append((str(path), f"unreadable ({type(e).__name__}: {e})"))
                continue
            why = check_result(obj)
            if why:
                broken.append((str(path), why))
            else:
                obj.setdefault("run_dir", str(path.parent))
                results.append(obj)
    if not results:
        detail = f" ({len(broken)} broken: see above)" if broken else ""
        raise EmbedkitError(f"no finished runs (results.json) under {', '.join(folders)}{detail}; run a "
                            "configuration or sweep first (e.g. `embedkit -m prompt=none,eol pooling=mean,last`)")
    return sorted(results, key=lambda r: (r.get("sweep") or "", r.get("job", 0), r.get("created", ""))), broken


def load_results(folders: list[str]) -> list[dict]:
    """The valid results under ``folders``; broken ones are listed on stderr."""
    results, broken = scan(folders)
    print_broken(broken)
    return results


def print_broken(broken: list[tuple[str, str]]) -> None:
    if broken:
        print(f"embedkit-report: skipped {len(broken)} broken run(s):", file=sys.stderr)
        for path, why in broken:
            print(f"  {path}: {why}", file=sys.stderr)


def select_models(results: list[dict], models: list[str] | None, folders: list[str]) -> list[dict]:
    if not models:
        return results
    have = sorted({r["model"] for r in results})
    missing = [m for m in models if m not in have]
    if missing:
        raise EmbedkitError(f"no results for model {', '.join(missing)} under {', '.join(folders)} (models with "
                            f"results: {', '.join(have)}); run its sweep first, e.g. "
                            f"`make table-pooling MODEL={missing[0]}`")
    return [r for r in results if r["model"] in models]


# --- published numbers --------------------------------------------------------------------------------

def load_references() -> dict:
    """The reference data files shipped in ``embedkit/report/references`` (paper, MTEB leaderboard)."""
    folder = resources.files("embedkit.report") / "references"
    return {name: yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
            for name in ("paper", "mteb_leaderboard")}


def task_set(result: dict, refs: dict) -> str | None:
    """The named MTEB task set a run evaluated (e.g. mteb_clustering_v2), or None for anything else."""
    names = set(result["scores"])
    for name, tasks in refs["mteb_leaderboard"]["task_sets"].items():
        if names == set(tasks):
            return name
    return None


def paper_entry(refs: dict, model: str, prompt: str, pooling: str) -> dict | None:
    for e in refs["paper"]["entries"]:
        if (e["model"], e["prompt"], e["pooling"]) == (model, prompt, pooling):
            return e
    return None


# --- tables -------------------------------------------------------------------------------------------

@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    heat: tuple | None = None  # (title, rows label, cols label, row keys, col keys, cells) for the PNG

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.header)
            w.writerows([[c.replace("**", "") for c in row] for row in self.rows])


def fmt(v: float | None, bold: bool = False) -> str:
    if v is None:
        return ""
    return f"**{v:.1f}**" if bold else f"{v:.1f}"


def ordered(values, order=POOLING_ORDER) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def tasks_of(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t in r["scores"]))


def untuned(results: list[dict]) -> list[dict]:
    return [r for r in results if "train" not in r]


def pooling_table(results: list[dict], refs: dict) -> Table:
    """Paper table 1: pooling (columns) x model (rows), no prompt."""
    runs = [r for r in untuned(results) if r["prompt"] == "none"]
    if not runs:
        raise EmbedkitError("the pooling table compares poolings without a prompt, and these runs have none with "
                            "prompt=none; run `make table-pooling` (experiment=table_pooling) first")
    poolings = ordered(r["pooling"] for r in runs)
    models = list(dict.fromkeys(r["model"] for r in runs))
    cells = {(r["model"], r["pooling"]): 100 * r["mean"] for r in runs}  # later runs win on duplicates
    sets = {r["model"]: task_set(r, refs) for r in runs}
    rows, notes = [], []
    for m in models:
        vals = [cells.get((m, p)) for p in poolings]
        best = max(v for v in vals if v is not None)
        rows.append([m, *(fmt(v, v == best) for v in vals)])
        published = [paper_entry(refs, m, "none", p) for p in poolings]
        if any(published):
            rows.append([f"{m} (paper)", *(fmt(e["mean"]) if e else "" for e in published)])
            if sets[m] in refs["paper"]["task_sets"]:
                rows.append(["difference", *(f"{cells[(m, p)] - e['mean']:+.1f}" if e and (m, p) in cells else ""
                                             for p, e in zip(poolings, published))])
            else:
                notes.append(f"{m}: published numbers are MTEB English clustering averages; these runs used other "
                             "tasks, so no difference is shown")
    known = {e["model"] for e in refs["paper"]["entries"]}
    notes += [f"{m}: no published numbers (the paper's known numbers are for {', '.join(sorted(known))})"
              for m in models if m not in known]
    notes += [f"paper, stated without numbers: {c['text']}" for c in refs["paper"].get("claims", [])
              if c["table"] == "pooling"]
    title = f"Pooling without a prompt: mean V-measure x100 over {', '.join(tasks_of(runs))}"
    return Table(title, ["model", *poolings], rows, notes, (title, "model", "pooling", models, poolings, cells))


def prompts_table(results: list[dict], refs: dict) -> Table:
    """Paper table 2: prompt (rows) x pooling (columns), per model."""
    runs = untuned(results)
    if not runs:
        raise EmbedkitError("no runs without fine-tuning under the given folders; run `make table-prompts` first")
    poolings = ordered(r["pooling"] for r in runs)
    models = list(dict.fromkeys(r["model"] for r in runs))
    cells = {(r["model"], r["prompt"], r["pooling"]): 100 * r["mean"] for r in runs}
    sets = {r["model"]: task_set(r, refs) for r in runs}
    rows, notes, heat_cells = [], [], {}
    for m in models:
        prompts = list(dict.fromkeys(r["prompt"] for r in runs if r["model"] == m))
        best = max(v for (mm, _, _), v in cells.items() if mm == m)
        for pr in prompts:
            vals = [cells.get((m, pr, p)) for p in poolings]
            rows.append([m, pr, *(fmt(v, v == best) for v in vals)])
            for p, v in zip(poolings, vals):
                if v is not None:
                    heat_cells[(pr if len(models) == 1 else f"{m} / {pr}", p)] = v
            published = [paper_entry(refs, m, pr, p) for p in poolings]
            if any(published):
                rows.append([m, f"{pr} (paper)", *(fmt(e["mean"]) if e else "" for e in published)])
                if sets[m] in refs["paper"]["task_sets"]:
                    rows.append([m, f"{pr} (difference)",
                                 *(f"{cells[(m, pr, p)] - e['mean']:+.1f}" if e and (m, pr, p) in cells else ""
                                   for p, e in zip(poolings, published))])
                elif not any(n.startswith(f"{m}:") for n in notes):
                    notes.append(f"{m}: published numbers are MTEB English clustering averages; these runs used "
                                 "other tasks, so no difference is shown")
    known = {e["model"] for e in refs["paper"]["entries"]}
    notes += [f"{m}: no published numbers (the paper's known numbers are for {', '.join(sorted(known))})"
              for m in models if m not in known]
    title = f"Prompt x pooling: mean V-measure x100 over {', '.join(tasks_of(runs))}"
    heat_rows = list(dict.fromkeys(k[0] for k in heat_cells))
    return Table(title, ["model", "prompt", *poolings], rows, notes,
                 (title, "prompt", "pooling", heat_rows, poolings, heat_cells))


def _pair_source(r: dict) -> tuple[str, str]:
    aug = r.get("config", {}).get("augmentation", {}).get("name", "none")
    name = r["train"].get("pairs", {}).get("name", "?")
    return (name.removesuffix(f"+{aug}") if aug != "none" else name), aug


def finetune_table(results: list[dict], refs: dict | None = None) -> Table:
    """Paper table 3: pair source / augmentation (rows) x pooling (columns), before -> after."""
    tuned = [r for r in results if "train" in r]
    if not tuned:
        raise EmbedkitError("no fine-tuned runs (train=lora...) under the given folders; run `make table-finetune` first")
    poolings = ordered(r["pooling"] for r in tuned)
    keys = list(dict.fromkeys((r["model"], r["prompt"], *_pair_source(r)) for r in tuned))
    cells = {((r["model"], r["prompt"], *_pair_source(r)), r["pooling"]): r for r in tuned}
    rows, heat = [], {}
    for k in keys:
        vals = []
        for p in poolings:
            r = cells.get((k, p))
            if r is None:
                vals.append("")
                continue
            before, after = 100 * r["mean_before"], 100 * r["mean"]
            t = r["train"]
            vals.append(f"{before:.1f} -> {after:.1f} ({after - before:+.1f}; {t['steps']} x "
                        f"{t['pairs_seen'] // max(t['steps'], 1)})")
            heat[(" / ".join(k[2:]), p)] = after
        rows.append([*k, *vals])
    title = ("Fine-tuning: mean V-measure x100 before -> after (change; steps x pairs per step) over "
             + ", ".join(tasks_of(tuned)))
    notes = ["the paper's before/after numbers are not available (../shared/docs/paper.md), so none are shown"]
    heat_rows = list(dict.fromkeys(k[0] for k in heat))
    return Table(title, ["model", "prompt", "pairs", "augmentation", *poolings], rows, notes,
                 (title.split(" over ")[0] + " (after)", "pairs / augmentation", "pooling", heat_rows, poolings, heat))


def _label(r: dict) -> str:
    tuned = " +LoRA" if ("train" in r or r.get("adapter")) else ""
    return f"{r['model']} {r['prompt']}/{r['pooling']}{tuned}"


def reference_table(results: list[dict], refs: dict) -> Table:
    """Paper table 4: per-task scores of our configurations (best first) next to published models."""
    runs = sorted({_label(r): r for r in results}.values(), key=lambda r: -r["mean"])
    tasks = tasks_of(runs)
    board = refs["mteb_leaderboard"]["models"]
    header = ["task", *(_label(r) for r in runs), *(f"{m['name']} (published)" for m in board)]
    best = runs[0]
    if len(runs) and any(set(m["scores"]) & set(tasks) for m in board):
        header.append(f"{_label(best)} - {board[0]['name']}")
    rows = []
    for t in tasks:
        ours = [100 * r["scores"][t] if t in r["scores"] else None for r in runs]
        top = max((v for v in ours if v is not None), default=None)
        theirs = [m["scores"].get(t) for m in board]
        row = [t, *(fmt(v, v == top) for v in ours), *(fmt(v) for v in theirs)]
        if len(header) > len(row):
            row.append(f"{100 * best['scores'][t] - theirs[0]:+.1f}" if t in best["scores"] and theirs[0] is not None
                       else "")
        rows.append(row)
    mean_row = [f"mean ({len(tasks)} tasks)", *(fmt(100 * r["mean"]) for r in runs)]
    notes = []
    for m in board:
        comparable = task_set(best, refs) == m["task_set"]
        mean_row.append(fmt(m["mean"]))
        notes.append(f"{m['name']}: {m['benchmark']}; source: {m['scores_source']}"
                     + ("" if comparable else f" -- these runs did not evaluate that task set, so its mean is "
                        "context, not a comparison"))
    if len(header) > len(mean_row):
        mean_row.append(f"{100 * best['mean'] - board[0]['mean']:+.1f}" if task_set(best, refs) == board[0]["task_set"]
                        else "")
    rows.append(mean_row)
    for r in runs:
        e = paper_entry(refs, r["model"], r["prompt"], r["pooling"])
        if e and "train" not in r:
            notes.append(f"paper, {r['model']} {r['prompt']}/{r['pooling']}: {e['mean']} ({e['source']})")
    title = "Per-task V-measure x100 of our configurations (best first) and published models"
    cells = {(t, _label(r)): 100 * r["scores"][t] for r in runs for t in tasks if t in r["scores"]}
    return Table(title, header, rows, notes, (title, "task", "configuration", tasks, [_label(r) for r in runs], cells))


BUILDERS = {"pooling": pooling_table, "prompts": prompts_table, "finetune": finetune_table,
            "reference": reference_table}


# --- the generic pivot (no --table) ------------------------------------------------------------------

def _value(result: dict, value: str) -> float | None:
    v = result["mean"] if value == "mean" else result["scores"].get(value)
    return None if v is None else 100 * v


def pivot(results: list[dict], rows: str, cols: str, value: str = "mean"):
    """(row labels, column labels, {(row, col): score x 100}); later runs win on duplicates."""
    for field_name in (rows, cols):
        if any(field_name not in r for r in results):
            raise EmbedkitError(f"--rows/--cols: field {field_name!r} is not in every results.json; use a top-level "
                                "field such as model, prompt, pooling")
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


def finetune_details(results: list[dict]) -> str:
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


def write_runs_csv(path: Path, results: list[dict]) -> None:
    """One row per run: configuration, mean (before), per-task scores, where scores came from."""
    tasks = sorted({t for r in results for t in r["scores"]})
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "prompt", "pooling", "train", "mean", "mean_before", *tasks, "from_cache", "run_dir"])
        for r in results:
            w.writerow([r["model"], r["prompt"], r["pooling"], r.get("config", {}).get("train", {}).get("name", ""),
                        f"{r['mean']:.6f}", f"{r['mean_before']:.6f}" if "mean_before" in r else "",
                        *(f"{r['scores'][t]:.6f}" if t in r["scores"] else "" for t in tasks),
                        len(r.get("from_cache", {}).get("scores", [])), r.get("run_dir", "")])


def _out_dir(out: str | None, folders: list[str]) -> Path:
    out_dir = Path(out or folders[0])
    return out_dir.parent if out_dir.is_file() else out_dir


def report(folders: list[str], rows: str = "prompt", cols: str = "pooling", value: str = "mean",
           out: str | None = None, plot: bool = True, models: list[str] | None = None) -> str:
    """The pivot table of the untuned runs (plus a before/after table of fine-tuned runs)."""
    everything = select_models(load_results(folders), models, folders)
    results = untuned(everything) or everything
    row_keys, col_keys, cells = pivot(results, rows, cols, value)
    model_names = sorted({r["model"] for r in results})
    tasks = sorted({t for r in results for t in r["scores"]})
    what = "mean V-measure" if value == "mean" else f"V-measure on {value}"
    title = f"{what} x100, {', '.join(model_names)}, tasks: {', '.join(tasks)}"
    md = to_markdown(title, rows, row_keys, col_keys, cells)
    tuned = finetune_details(everything)
    if tuned:
        md += "\n" + tuned
    out_dir = _out_dir(out, folders)
    with atomic_write(out_dir / "report.md", "w", encoding="utf-8") as f:
        f.write(md)
    write_runs_csv(out_dir / "report.csv", everything)
    if plot and len(cells) > 1:
        heatmap(out_dir / "report.png", title, rows, cols, row_keys, col_keys, cells)
    return md


def table_report(folders: list[str], table: str, out: str | None = None, plot: bool = True,
                 models: list[str] | None = None) -> tuple[str, list[Path]]:
    """One paper table (``pooling``, ``prompts``, ``finetune``, ``reference``) as Markdown, CSV and PNG."""
    if table not in BUILDERS:
        raise EmbedkitError(f"--table {table}: choose one of {', '.join(TABLES)}")
    results = select_models(load_results(folders), models, folders)
    t = BUILDERS[table](results, load_references())
    md = t.markdown()
    out_dir = _out_dir(out, folders)
    written = [out_dir / f"table-{table}.md", out_dir / f"table-{table}.csv", out_dir / "report.csv"]
    with atomic_write(written[0], "w", encoding="utf-8") as f:
        f.write(md)
    t.write_csv(written[1])
    write_runs_csv(written[2], results)
    if plot and t.heat and len(t.heat[5]) > 1:
        heatmap(out_dir / f"table-{table}.png", *t.heat)
        written.append(out_dir / f"table-{table}.png")
    return md, written


def main(argv: list[str] | None = None) -> None:
    from embedkit.commands.common import user_errors_as_messages

    p = argparse.ArgumentParser(prog="embedkit-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="run or sweep folders (searched for results.json)")
    p.add_argument("--table", choices=TABLES, default=None,
                   help="a paper table with published numbers beside ours (default: a generic pivot)")
    p.add_argument("--model", default=None,
                   help="only these models' runs (comma-separated); an error if one has no results")
    p.add_argument("--rows", default="prompt", help="result field for rows (default: prompt)")
    p.add_argument("--cols", default="pooling", help="result field for columns (default: pooling)")
    p.add_argument("--value", default="mean", help="'mean' or a task name (default: mean)")
    p.add_argument("--out", default=None, help="folder for the report files (default: first folder)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    models = [m for m in (args.model or "").split(",") if m] or None
    with user_errors_as_messages("embedkit-report"):
        if args.table:
            md, written = table_report(args.folders, args.table, args.out, plot=not args.no_plot, models=models)
            print(md)
            print("written: " + ", ".join(map(str, written)))
            return
        md = report(args.folders, args.rows, args.cols, args.value, args.out, plot=not args.no_plot, models=models)
    out_dir = _out_dir(args.out, args.folders)
    print(md)
    print(f"written: {out_dir / 'report.md'}, {out_dir / 'report.csv'}"
          + (f", {out_dir / 'report.png'}" if (out_dir / "report.png").exists() else ""))


if __name__ == "__main__":
    main()
