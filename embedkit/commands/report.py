"""``embedkit-report``: rebuild tables from finished runs' ``results.json`` without running anything.

    embedkit-report outputs/demo/2026-11-25_21-40-00            # prompts x poolings, mean V-measure
    embedkit-report outputs/multirun/... --rows model --cols pooling
    embedkit-report DIR --value twentynewsgroups/test          # one task's score instead of the mean
    embedkit-report outputs/tables/pooling --table pooling     # a paper table, published numbers beside ours
    embedkit-report DIR --table prompts --model llama-3.2-1b   # only this model's runs
    embedkit-report DIR --mteb-results ~/results               # beside published models (MTEB results repo copy)
    embedkit-report DIR --table levers --wandb                 # also one W&B run: tables and PNGs

Without ``--table`` it writes ``report.md``, ``report.csv`` (one row per run) and ``report.png`` (heat map)
into the first folder (or --out); with ``--table NAME`` it writes ``table-NAME.md/.csv/.png`` and
``report.csv``; with ``--wandb`` it also logs them as one W&B run (job_type ``report``) in the group of the
runs it reads: the per-run table, the paper table and the PNGs. Scores are V-measure x 100. Published
numbers come from the data files in ``embedkit/report/references/`` (each with its source); a difference
is shown only where our runs used the same task set as the published number. Broken runs (half-written or
invalid ``results.json``, missing fields) are skipped and listed.
"""

from __future__ import annotations

import argparse

from embedkit.commands.common import offline_by_default, user_errors_as_messages
from embedkit.report.outputs import log_report, output_folder, report, table_report
from embedkit.report.mteb_table import mteb_report
from embedkit.report.tables import TABLES


def main(argv: list[str] | None = None) -> None:
    """The ``embedkit-report`` console script: parse ``argv`` (default ``sys.argv[1:]``), write the report
    files and print the markdown and what was written."""
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
    p.add_argument("--mteb-results", default=None, metavar="DIR",
                   help="our runs beside the models of a local copy of the MTEB results repository, on one "
                        "task set (writes table-mteb.md/.csv)")
    p.add_argument("--benchmark", default=None,
                   help="with --mteb-results: the mteb benchmark whose clustering tasks are the columns "
                        "(default: MTEB(eng, v1) or MTEB(eng, v2), whichever our runs scored)")
    p.add_argument("--top", type=int, default=10, help="with --mteb-results: published models shown (default 10)")
    p.add_argument("--wandb", action="store_true",
                   help="also log the report (per-run table, paper table, PNGs) as one W&B run in the runs' group")
    args = p.parse_args(argv)
    models = [m for m in (args.model or "").split(",") if m] or None
    if args.wandb:
        offline_by_default()  # wandb's own console lines off: the report prints where its run went
    with user_errors_as_messages("embedkit-report"):
        if args.mteb_results:
            md, written = mteb_report(args.folders, args.mteb_results, args.benchmark, args.top, args.out, models)
            print(md)
            print("written: " + ", ".join(map(str, written)))
            return
        if args.table:
            md, written = table_report(args.folders, args.table, args.out, plot=not args.no_plot, models=models)
            print(md)
            print("written: " + ", ".join(map(str, written)))
            if args.wandb:
                pngs = list(dict.fromkeys(p for p in written if p.suffix == ".png"))
                print(log_report(args.folders, output_folder(args.out, args.folders), pngs, models, args.table))
            return
        md = report(args.folders, args.rows, args.cols, args.value, args.out, plot=not args.no_plot, models=models)
    out_dir = output_folder(args.out, args.folders)
    print(md)
    print(f"written: {out_dir / 'report.md'}, {out_dir / 'report.csv'}"
          + (f", {out_dir / 'report.png'}" if (out_dir / "report.png").exists() else ""))
    if args.wandb:
        png = out_dir / "report.png"
        print(log_report(args.folders, out_dir, [png] if png.exists() and not args.no_plot else [], models))


if __name__ == "__main__":
    main()
