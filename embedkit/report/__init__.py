"""Stage 4, reporting: the paper's tables (and the MTEB leaderboard's) from a folder of results.json
files, as markdown, CSV and heatmaps: `embedkit-report` (config group ``experiment`` runs them; the
command is ``embedkit.commands.report``).

Modules: ``results`` (scanning and loading results.json files, the reference data files), ``tables``
(the table builders and markdown), ``figures`` (the heat map) and ``outputs`` (the report files)."""

from embedkit.report.results import (
    check_result, is_peer, load_references, load_results, paper_entry, print_broken, scan, select_models, task_set,
    untuned,
)
from embedkit.report.tables import (
    BUILDERS, POOLING_ORDER, TABLES, Table, finetune_details, finetune_table, peer_details, peer_notes, pivot,
    pooling_table, prompts_table, reference_table, to_markdown,
)
from embedkit.report.figures import heatmap
from embedkit.report.outputs import output_folder, report, table_report, write_runs_csv

__all__ = [
    "BUILDERS", "POOLING_ORDER", "TABLES", "Table", "check_result", "finetune_details", "finetune_table", "heatmap",
    "is_peer", "load_references", "load_results", "output_folder", "paper_entry", "peer_details", "peer_notes", "pivot",
    "pooling_table", "print_broken", "prompts_table", "reference_table", "report", "scan", "select_models",
    "table_report", "task_set", "to_markdown", "untuned", "write_runs_csv",
]
