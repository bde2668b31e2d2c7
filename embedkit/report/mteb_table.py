"""Our runs beside the models of a local copy of the MTEB results repository (``embedkit-report FOLDERS
--mteb-results DIR``), on one named task set: a benchmark's tasks of one type, as mteb's benchmark object
lists them (``MTEB(eng, v1)``: the classic 11 English clustering tasks; ``MTEB(eng, v2)``: its 8).

Published scores are read by mteb's own ``ResultCache(DIR).load_results`` (DIR: a clone of
github.com/embeddings-benchmark/results, whose ``results/<org__model>/<revision>/<Task>.json`` is the
layout ``ResultCache`` reads, or an mteb cache folder), validated against each task's splits and subsets,
with a model's revisions joined by mteb's ``join_revisions``. Ours are the ``TaskResult``s each run writes
(``embedkit.evaluate.mteb_results``), rebuilt from its results.json. Cells are main scores x100; a missing
task is a blank cell, and the mean is taken over the tasks every row of the table has, which the notes name.
"""

from __future__ import annotations

import math
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.evaluate.mteb_results import model_meta, task_results
from embedkit.io import atomic_write
from embedkit.report.outputs import output_folder
from embedkit.report.results import is_peer, load_results, select_models
from embedkit.report.tables import Table, fmt

__all__ = ["BENCHMARKS", "benchmark_tasks", "mteb_report", "mteb_table", "our_rows", "published_rows"]

BENCHMARKS = ("MTEB(eng, v1)", "MTEB(eng, v2)")  # whose clustering tasks --benchmark picks from by default


def benchmark_tasks(benchmark: str, task_type: str = "Clustering") -> list:
    """The mteb task objects of ``benchmark`` of type ``task_type`` (from ``mteb.get_benchmark``)."""
    from embedkit.data.mteb import import_mteb

    mteb = import_mteb()
    try:
        tasks = [t for t in mteb.get_benchmark(benchmark).tasks if t.metadata.type == task_type]
    except (KeyError, ValueError) as e:
        raise EmbedkitError(f"--benchmark {benchmark!r}: not an mteb benchmark ({e.args[0] if e.args else e}; "
                            f"e.g. {', '.join(BENCHMARKS)})") from None
    if not tasks:
        raise EmbedkitError(f"--benchmark {benchmark!r} has no {task_type} tasks")
    return tasks


def _label(r: dict, meta) -> str:
    what = ("peer, our evaluation" if is_peer(r)
            else f"{r['prompt']}/{r['pooling']}" + (", LoRA" if "train" in r else ""))
    return f"**ours**: {r['model']} ({what}; {meta.name}@{meta.revision})"


def our_rows(results: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Row label -> {task: score} for the runs with a ``TaskResult`` on any of ``names`` (a later run of the
    same configuration replaces an earlier one)."""
    rows: dict[str, dict[str, float]] = {}
    for r in results:
        found = {t.task_name: float(t.get_score()) for t in task_results(r)[0] if t.task_name in names}
        if found:
            rows[_label(r, model_meta(r))] = found
    return rows


def published_rows(folder: str | Path, tasks: list) -> dict[str, dict[str, float]]:
    """Model (with its experiment, if any) -> {task: main score} from the results-repository copy at
    ``folder`` (its ``results/`` folder, or an mteb cache folder with ``remote/results``)."""
    from mteb.cache import ResultCache

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EmbedkitError(f"--mteb-results {folder}: no such folder; give a local copy of the MTEB results "
                            "repository (git clone https://github.com/embeddings-benchmark/results)")
    if not (root / "results").is_dir() and not (root / "remote" / "results").is_dir():
        if root.name != "results":
            raise EmbedkitError(f"--mteb-results {folder}: no results/ folder in it (expected the layout of "
                                "github.com/embeddings-benchmark/results: results/<org__model>/<revision>/<Task>.json)")
        root = root.parent
    loaded = ResultCache(root).load_results(tasks=tasks, require_model_meta=False, validate_and_filter=True,
                                            only_main_score=True, load_experiments="match_name")
    rows: dict[str, dict[str, float]] = {}
    for m in loaded.join_revisions():
        scores = {t.task_name: float(t.get_score()) for t in m.task_results}
        label = m.model_name + (f" ({m.experiment_name})" if m.experiment_name else "")
        rows[label] = {k: v for k, v in scores.items() if not math.isnan(v)}
    return {k: v for k, v in rows.items() if v}


def mteb_table(results: list[dict], folder: str | Path, benchmark: str | None = None, top: int = 10,
               task_type: str = "Clustering") -> Table:
    """The table: our runs, then the ``top`` published models (most of our tasks first, then by their mean
    on those), columns = the task set's tasks and the mean over the tasks every row has."""
    if top < 0:
        raise EmbedkitError(f"--top {top}: expected 0 or more published models")
    candidates = [benchmark] if benchmark else list(BENCHMARKS)
    sets = {b: [t.metadata.name for t in benchmark_tasks(b, task_type)] for b in candidates}
    ours_by = {b: our_rows(results, names) for b, names in sets.items()}
    benchmark = max(candidates, key=lambda b: sum(map(len, ours_by[b].values())))
    names, ours = sets[benchmark], ours_by[benchmark]
    if not ours:
        raise EmbedkitError(f"no run under the given folders scored a {task_type} task of {' or '.join(candidates)} "
                            f"(runs on local data have no MTEB tasks); run e.g. `EMBEDKIT_ONLINE=1 embedkit "
                            f"data=mteb_clustering_v1` first")
    mine = {t for row in ours.values() for t in row}

    def rank(item):  # most of our tasks first, then the best mean on those
        covered = mine & set(item[1])
        return -len(covered), -sum(item[1][t] for t in covered) / len(covered)

    published = published_rows(folder, benchmark_tasks(benchmark, task_type))
    ranked = sorted(((k, v) for k, v in published.items() if mine & set(v)), key=rank)
    shown = dict(ranked[:top])
    rows = {**ours, **shown}
    common = [t for t in names if all(t in row for row in rows.values())]
    header = ["model", *names, f"mean ({len(common)} common)"]
    body = [[label, *(fmt(100 * row[t]) if t in row else "" for t in names),
             fmt(100 * sum(row[t] for t in common) / len(common)) if common else ""] for label, row in rows.items()]
    title = f"Our runs beside published models: {benchmark}, its {len(names)} {task_type} tasks (main score x100)"
    notes = [f"task set: the {len(names)} {task_type} tasks of mteb.get_benchmark({benchmark!r}); a blank cell is a "
             "task without a result",
             (f"mean over the {len(common)} task(s) every row has: {', '.join(common)}" if common else
              "no task is in every row, so no mean is shown") + f" (of {len(names)})",
             f"published: {len(shown)} of the {len(ranked)} models in {folder} with results on our tasks"
             f" ({len(published)} with any task of the set), those covering most of our tasks and best on them"
             " first; mteb's join_revisions picks one revision per model and task"]
    return Table(title, header, body, notes)


def mteb_report(folders: list[str], mteb_results: str, benchmark: str | None = None, top: int = 10,
                out: str | None = None, models: list[str] | None = None) -> tuple[str, list[Path]]:
    """Write ``table-mteb.md`` and ``table-mteb.csv`` into ``out`` (default: the first folder); returns (the
    markdown, the files written)."""
    results = select_models(load_results(folders), models, folders)
    t = mteb_table(results, mteb_results, benchmark, top)
    out_dir = output_folder(out, folders)
    written = [out_dir / "table-mteb.md", out_dir / "table-mteb.csv"]
    md = t.markdown()
    with atomic_write(written[0], "w", encoding="utf-8") as f:
        f.write(md)
    t.write_csv(written[1])
    return md, written
