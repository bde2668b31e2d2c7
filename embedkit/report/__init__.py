"""Stage 4, reporting: the paper's tables (and the MTEB leaderboard's) from a folder of results.json
files, as markdown, CSV and heatmaps: `embedkit-report` (config group ``experiment`` runs them)."""

from embedkit.report.tables import load_results, report

__all__ = ["load_results", "report"]
