"""Named tasks of mteb's registry (``data=mteb``, ``data=mteb_clustering_v1``/``v2``): loaded here, so a
task that is not cached offline stops the run before any model work, and evaluated with mteb's own
evaluator. ``import_mteb`` is the one place mteb is imported (its import-time warnings silenced)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from embedkit.errors import EmbedkitError

__all__ = ["MtebTask", "import_mteb", "mteb_tasks"]


def import_mteb():
    """The ``mteb`` module, imported with its import-time warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mteb
    return mteb


@dataclass
class MtebTask:
    """A task of mteb's registry (e.g. TwentyNewsgroupsClustering), evaluated with its own evaluator."""

    task: object

    @property
    def name(self) -> str:
        """The task's mteb name (e.g. TwentyNewsgroupsClustering)."""
        return self.task.metadata.name

    def describe(self) -> dict:
        """What results.json records about the task: source dataset and revision, type, main score, splits."""
        meta = self.task.metadata
        return {"source": f"mteb:{meta.dataset['path']}@{meta.dataset.get('revision')}", "type": meta.type,
                "main_score": meta.main_score, "eval_splits": list(meta.eval_splits)}


def mteb_tasks(tasks: list[str] | None = None, benchmark: str | None = None,
               task_type: str | None = "Clustering") -> list[MtebTask]:
    """Named MTEB tasks, or the tasks of a benchmark filtered by type; data are loaded here (from the
    datasets cache, or the hub with EMBEDKIT_ONLINE=1), so a missing dataset stops the run before any
    model work."""
    mteb = import_mteb()
    try:
        if benchmark:
            found = [t for t in mteb.get_benchmark(benchmark).tasks if task_type is None or t.metadata.type == task_type]
        else:
            if not tasks:
                raise EmbedkitError("data.tasks is empty; name MTEB tasks, e.g. data.tasks=[TwentyNewsgroupsClustering]")
            found = list(mteb.get_tasks(tasks=list(tasks)))
    except KeyError as e:
        raise EmbedkitError(f"unknown MTEB task or benchmark: {e.args[0]}") from None
    for task in found:
        try:
            task.load_data()
        except (ConnectionError, OSError) as e:
            raise EmbedkitError(
                f"MTEB task {task.metadata.name} is not cached and the hub is unreachable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Run once with internet and EMBEDKIT_ONLINE=1 to download it, "
                "or evaluate local data with data=jsonl data.root=...") from None
    return [MtebTask(t) for t in found]
