"""The tables of a report, as markdown and CSV: the paper's four tables (``pooling``, ``prompts``,
``finetune``, ``reference``), each with the published numbers beside ours where they exist, the generic
pivot of any two result fields (no ``--table``), the before/after table of fine-tuned runs and the rows of
peers (sentence-transformers models) beside the LLMs' best configurations. Cells are V-measure x 100; a
``Table`` also carries what its heat map shows."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.embed.pooling import MODES
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.report.adapt import adapt_table
from embedkit.report.levers import levers_table
from embedkit.report.results import is_peer, paper_entry, task_set, untuned

TABLES = ("pooling", "prompts", "finetune", "reference", "levers", "adapt")
POOLING_ORDER = MODES  # table rows in the order the poolings are defined


# --- tables -------------------------------------------------------------------------------------------

@dataclass
class Table:
    """One report table: its title, header and rows of cell strings (``**bold**`` marks a best value),
    notes printed below it, and ``heat``, what its heat map shows (None: no heat map)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    heat: tuple | None = None  # (title, rows label, cols label, row keys, col keys, cells) for the PNG

    def markdown(self) -> str:
        """The table as a markdown section: a ``###`` title, the table, then the notes as a list."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        """The header and rows as CSV at ``path`` (bold marks removed); returns None."""
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.header)
            w.writerows([[c.replace("**", "") for c in row] for row in self.rows])


def fmt(v: float | None, bold: bool = False) -> str:
    """``v`` with one decimal (``**bold**`` if ``bold``); an empty string for None."""
    if v is None:
        return ""
    return f"**{v:.1f}**" if bold else f"{v:.1f}"


def ordered(values, order=POOLING_ORDER) -> list[str]:
    """The distinct ``values``: those in ``order`` first, in that order, then the others as they come."""
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def tasks_of(results: list[dict]) -> list[str]:
    """The tasks scored in ``results``, distinct, in the order they first occur."""
    return list(dict.fromkeys(t for r in results for t in r["scores"]))


def pooling_table(results: list[dict], refs: dict) -> Table:
    """Paper table 1: pooling (columns) x model (rows), no prompt.

    Takes the results and the reference data (``load_references()``); returns the ``Table``."""
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
    notes += peer_notes(results)
    title = f"Pooling without a prompt: mean V-measure x100 over {', '.join(tasks_of(runs))}"
    return Table(title, ["model", *poolings], rows, notes, (title, "model", "pooling", models, poolings, cells))


def prompts_table(results: list[dict], refs: dict) -> Table:
    """Paper table 2: prompt (rows) x pooling (columns), per model.

    Takes the results and the reference data (``load_references()``); returns the ``Table``."""
    runs = [r for r in untuned(results) if not is_peer(r)]  # a peer has no prompt or pooling: a note below
    if not runs:
        raise EmbedkitError("no LLM runs without fine-tuning under the given folders; run `make table-prompts` first")
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
    notes += peer_notes(results)
    title = f"Prompt x pooling: mean V-measure x100 over {', '.join(tasks_of(runs))}"
    heat_rows = list(dict.fromkeys(k[0] for k in heat_cells))
    return Table(title, ["model", "prompt", *poolings], rows, notes,
                 (title, "prompt", "pooling", heat_rows, poolings, heat_cells))


def _pair_source(r: dict) -> tuple[str, str]:
    aug = r.get("config", {}).get("augmentation", {}).get("name", "none")
    name = r["train"].get("pairs", {}).get("name", "?")
    return (name.removesuffix(f"+{aug}") if aug != "none" else name), aug


def finetune_table(results: list[dict], refs: dict | None = None) -> Table:
    """Paper table 3: pair source / augmentation (rows) x pooling (columns), before -> after.

    Takes the results (``refs`` is unused: no published numbers exist); returns the ``Table``."""
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
    if is_peer(r):
        return f"{r['model']} (peer)"
    tuned = " +LoRA" if ("train" in r or r.get("adapter")) else ""
    return f"{r['model']} {r['prompt']}/{r['pooling']}{tuned}"


def reference_table(results: list[dict], refs: dict) -> Table:
    """Paper table 4: per-task scores of our configurations (best first) next to published models.

    Takes the results and the reference data (``load_references()``); returns the ``Table``."""
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
                     + ("" if comparable else " -- these runs did not evaluate that task set, so its mean is "
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
            "reference": reference_table, "levers": levers_table, "adapt": adapt_table}


# --- the generic pivot (no --table) ------------------------------------------------------------------

def _value(result: dict, value: str) -> float | None:
    v = result["mean"] if value == "mean" else result["scores"].get(value)
    return None if v is None else 100 * v


def pivot(results: list[dict], rows: str, cols: str, value: str = "mean"):
    """The ``value`` (``mean`` or a task name) of ``results`` by result fields ``rows`` x ``cols``.

    Returns (row labels, column labels, {(row, col): score x 100}); later runs win on duplicates."""
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
    """The pivot of ``pivot`` as a markdown section titled ``title``, ``rows`` heading the first column; the
    best cell is bold."""
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


def finetune_details(results: list[dict]) -> str:
    """Before/after rows for runs that fine-tuned (``train=...``): a markdown section, or "" if none did."""
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


# --- peers beside the LLMs -------------------------------------------------------------------------------

def _own_pooling(r: dict) -> str:
    peer = r.get("peer") or {}
    return f"{peer.get('pooling', '?')}{'+normalize' if peer.get('normalize') else ''}"


def peer_notes(results: list[dict]) -> list[str]:
    """One note per peer run in ``results`` (for the paper tables, whose grid of prompts and poolings a peer
    has no place in): its mean V-measure x100 and the tasks it was scored on."""
    return [f"peer {r['model']} (sentence-transformers; no prompt, its own {_own_pooling(r)} pooling): "
            f"{100 * r['mean']:.1f} mean over {', '.join(r['scores'])}" for r in results if is_peer(r)]


def peer_details(results: list[dict]) -> str:
    """Peers beside the LLMs, one row each: every peer (and task set), and per LLM model its best configuration
    without and with fine-tuning, with their mean and per-task V-measure x100 (the best mean bold). A markdown
    section, or "" if no peer run is among ``results``."""
    peers = [r for r in results if is_peer(r)]
    if not peers:
        return ""
    # one row per peer and task set (the same model re-run, e.g. under another prompt that it ignores: the latest)
    peers = list({(r["model"], r["peer"].get("weights_sha256"), tuple(r["scores"])): r for r in peers}.values())
    llms = [r for r in results if not is_peer(r)]
    rows = []
    for model in dict.fromkeys(r["model"] for r in llms):
        for tuned in (False, True):
            runs = [r for r in llms if r["model"] == model and ("train" in r) == tuned]
            if runs:
                kind = (f"LLM, best of {len(runs)}{' fine-tuned' if tuned else ''} "
                        f"configuration{'s' * (len(runs) != 1)}")
                rows.append((max(runs, key=lambda r: r["mean"]), kind))
    rows += [(r, "peer (sentence-transformers)") for r in peers]
    tasks = tasks_of([r for r, _ in rows])
    best = max(r["mean"] for r, _ in rows)
    lines = ["### peers beside the LLMs: V-measure x100", "",
             "| model | kind | prompt | pooling | mean | " + " | ".join(tasks) + " |",
             "|" + "---|" * (5 + len(tasks))]
    for r, kind in rows:
        name = f"{r['model']} +LoRA" if "train" in r else r["model"]
        cells = [fmt(100 * r["scores"][t]) if t in r["scores"] else "" for t in tasks]
        lines.append(f"| {name} | {kind} | {r['prompt']} | {r['pooling']} | "
                     f"{fmt(100 * r['mean'], r['mean'] == best)} | " + " | ".join(cells) + " |")
    if len({tuple(sorted(r["scores"])) for r, _ in rows}) > 1:
        lines += ["", "- these rows were scored on different tasks: compare the per-task columns, not the means"]
    return "\n".join(lines) + "\n"
