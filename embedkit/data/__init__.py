"""Stage 0, data: labelled clustering sets (JSONL folders, the embedded stdlib set, MTEB tasks) and the
positive pairs that training reads (config groups ``data`` and ``pairs``)."""

from embedkit.data.clustering import ClusteringSet, MtebTask, load_jsonl_folder, mteb_tasks, stdlib_docstrings
from embedkit.data.pairs import PairSet, load_pairs, stdlib_pairs

__all__ = ["ClusteringSet", "MtebTask", "PairSet", "load_jsonl_folder", "load_pairs", "mteb_tasks",
           "stdlib_docstrings", "stdlib_pairs"]
