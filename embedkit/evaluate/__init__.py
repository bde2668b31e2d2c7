"""Stage 3, evaluation: clustering V-measure through mteb's own evaluators, with a result cache keyed by
everything a score depends on (config group ``eval``)."""

from embedkit.evaluate.result_cache import ResultCache
from embedkit.evaluate.clustering import ClusteringEvaluator, content_digest, mteb_model, mteb_task  # noqa: E402

__all__ = ["ClusteringEvaluator", "ResultCache", "content_digest", "mteb_model", "mteb_task"]
