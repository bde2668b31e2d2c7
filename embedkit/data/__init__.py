"""Stage 0, data: labelled clustering sets (JSONL folders, the embedded stdlib set, MTEB tasks) and the
positive pairs that training reads (config groups ``data`` and ``pairs``)."""

from embedkit.data.clustering import ClusteringSet, load_jsonl_folder
from embedkit.data.mteb import MtebTask, import_mteb, mteb_tasks
from embedkit.data.stdlib import stdlib_docstrings
from embedkit.data.pairs import PairSet, load_pairs, stdlib_pairs  # noqa: E402 - pairs build on stdlib

__all__ = ["ClusteringSet", "MtebTask", "PairSet", "import_mteb", "load_jsonl_folder", "load_pairs", "mteb_tasks",
           "stdlib_docstrings", "stdlib_pairs"]
