"""A run's scores as mteb ``TaskResult`` files in an mteb ``ResultCache`` folder (``paths.mteb_results``),
so mteb's own tools (``ResultCache(folder).load_results(...)``, its leaderboard code, a submission to the
results repository) read our runs beside published models.

**Identity.** Each run becomes one ``ModelMeta``: name ``embedkit/<model>``; ``experiment_kwargs`` hold
everything besides the task that changes a score (the backbone's source, its dtype and quantization, the
adapter's content hash, the prompt and its template(s), the pooling with its layer/span/final-norm levers,
``encode.max_length``); the revision is a short hash of those kwargs. Two configurations of one model so
never share a folder: ``results/embedkit__<model>/<revision>/experiments/<experiment>/<Task>.json`` with a
``model_meta.json`` beside (mteb's own layout; ``get_task_result_path`` computes it). mteb loads experiment
folders only when asked: ``load_results(..., load_experiments="match_name")`` or with the ``ModelMeta``.

**Which tasks.** Only tasks of mteb's registry (``data=mteb*``; their results.json source is ``mteb:...``)
get files, and only those scored on one split and one subset (every MTEB(eng) clustering task), because
results.json keeps one number per task and a ``TaskResult`` holds one per split and subset. Local sets
(``data=jsonl``/``stdlib``, tasks like ``arxiv/s2s``) get none: mteb would load them (``load_results`` reads
any task name, and mteb's ``get_task`` fails on it only when asked for task metadata), but a name like
``arxiv/s2s`` is a path inside the layout, and the sets of ../shared/data mirror MTEB tasks without being
them (other rows, subsets), so a file there would sit beside published scores of another dataset.

A fine-tuned run writes its scores under the tuned adapter's identity and ``scores_before`` under the
backbone's. Files are written atomically (temporary file, then rename); a failure is a warning, never a
failed run (results.json holds every score).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import datetime
from pathlib import Path

from embedkit.data.mteb import import_mteb
from embedkit.io import fsync_dir, write_json

__all__ = ["ORG", "adapter_identity", "experiment_kwargs", "model_meta", "registry_task", "task_results",
           "write_mteb_results"]

log = logging.getLogger(__name__)

ORG = "embedkit"  # the organisation part of every ModelMeta name: embedkit/<model>


def adapter_identity(adapter: str | None) -> str | None:
    """An adapter's identity: the SHA-256 (16 hex) of its ``adapter_model.safetensors`` (the digest the
    trainer gives a freshly tuned adapter), or its path when that file is not readable; None: no adapter."""
    if not adapter:
        return None
    weights = Path(adapter).expanduser() / "adapter_model.safetensors"
    try:
        with open(weights, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:16]
    except OSError:
        return str(adapter)


def experiment_kwargs(results: dict, tuned: bool = True) -> dict:
    """Everything besides the task that a run's scores depend on, from its results.json: backbone, dtype,
    adapter, prompt (name, template, ensemble members, per-task templates), pooling levers, max_length.
    ``tuned=False`` describes the backbone before fine-tuning (``scores_before``)."""
    model_cfg = results.get("config", {}).get("model", {})
    source = model_cfg.get("name_or_path") or Path(str(results.get("model_source", ""))).name
    spec = dict(results.get("pooling_spec", {}))
    spec.pop("name", None)
    if "layers_resolved" in spec:  # -1 and 29 are the same block: keep the resolved one
        spec["layer"] = spec.pop("layers_resolved")
    adapter = results.get("adapter") if tuned else model_cfg.get("adapter")
    kwargs = {
        "backbone": source, "backbone_revision": model_cfg.get("revision"),
        "weights_sha256": (results.get("peer") or {}).get("weights_sha256"),
        "dtype": results.get("encode", {}).get("dtype"), "quantization": model_cfg.get("quantization"),
        "adapter": adapter_identity(adapter),
        "prompt": results.get("prompt"), "prompt_template": results.get("prompt_template"),
        "prompt_members": results.get("prompt_members"), "prompt_per_task": results.get("prompt_per_task"),
        "pooling": results.get("pooling"), "pooling_spec": spec,
        "max_length": results.get("encode", {}).get("max_length"),
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def model_meta(results: dict, tuned: bool = True):
    """The mteb ``ModelMeta`` of a run (see the module doc): name ``embedkit/<model>``, revision = 12 hex of
    the SHA-256 of ``experiment_kwargs``, which it carries."""
    import_mteb()
    from mteb.models import ModelMeta

    kwargs = experiment_kwargs(results, tuned)
    revision = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    peer = results.get("peer") or {}
    return ModelMeta(
        loader=None, name=f"{ORG}/{results['model']}", revision=revision, release_date=None, languages=None,
        n_parameters=None, memory_usage_mb=None, max_tokens=kwargs.get("max_length"),
        embed_dim=peer.get("dimension"), license=None, open_weights=True, public_training_code=None,
        public_training_data=None, framework=["Sentence Transformers", "PyTorch"] if peer else ["PyTorch"],
        similarity_fn_name="cosine", training_datasets=None, experiment_kwargs=kwargs,
        use_instructions=kwargs.get("prompt_template", "{text}") not in ("{text}", "n/a"),
    )


def registry_task(name: str, info: dict):
    """The mteb task of a results.json task entry if it is a registry task (``source`` ``mteb:...``) that
    mteb still knows, else None."""
    if not str(info.get("source", "")).startswith("mteb:"):
        return None
    mteb = import_mteb()
    try:
        return mteb.get_task(name)
    except (KeyError, ValueError):
        return None


def task_results(results: dict, scores_key: str = "scores") -> tuple[list, dict[str, str]]:
    """``(TaskResults, skipped)``: one mteb ``TaskResult`` per registry task of ``results[scores_key]``
    (split and subset of the task's metadata, ``main_score`` and the task's main metric = our score,
    dataset revision as the run recorded it), and ``{task: why no TaskResult}`` for the others. A run with no
    registry task does not import mteb (seconds of start-up per run)."""
    tasks = results.get("tasks", {})
    if not any(str(tasks.get(n, {}).get("source", "")).startswith("mteb:") for n in results.get(scores_key, {})):
        return [], {n: "not an MTEB registry task" for n in results.get(scores_key, {})}
    mteb = import_mteb()
    out, skipped = [], {}
    created = results.get("created")
    for name, score in results.get(scores_key, {}).items():
        info = results.get("tasks", {}).get(name, {})
        task = registry_task(name, info)
        if task is None:
            skipped[name] = ("not an MTEB registry task" if not str(info.get("source", "")).startswith("mteb:")
                             else "unknown to the installed mteb")
            continue
        meta = task.metadata
        if len(meta.eval_splits) != 1 or len(meta.hf_subsets) != 1:
            skipped[name] = (f"scored over {len(meta.eval_splits)} split(s) x {len(meta.hf_subsets)} subset(s); "
                             "results.json keeps only their mean")
            continue
        scores = {meta.eval_splits[0]: {meta.hf_subsets[0]: {"main_score": score, meta.main_score: score}}}
        result = mteb.TaskResult.from_task_results(
            task, scores, evaluation_time=None, date=datetime.fromisoformat(created) if created else None)
        recorded = str(info["source"]).rpartition("@")[2]
        if recorded and recorded != "None" and recorded != result.dataset_revision:
            result = result.model_copy(update={"dataset_revision": recorded})
        out.append(result)
    return out, skipped


def _write_task_result(result, path: Path) -> None:
    """mteb's own ``TaskResult.to_disk`` into a temporary file beside ``path``, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result.to_disk(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_mteb_results(results: dict, root: str | os.PathLike | None) -> list[Path]:
    """Write a finished run's registry-task scores as ``TaskResult`` files under ``root`` (an mteb
    ``ResultCache`` folder; None: off) and return their paths; any error is logged as a warning."""
    if not root:
        return []
    written: list[Path] = []
    try:
        parts = [("scores", True)] + ([("scores_before", False)] if "scores_before" in results else [])
        cache = None
        for key, tuned in parts:
            found, skipped = task_results(results, key)
            if skipped and key == "scores":
                log.info("mteb results: no TaskResult for %d task(s) (%s): %s", len(skipped), ", ".join(skipped),
                         "; ".join(sorted(set(skipped.values()))))
            if not found:
                continue
            from mteb.cache import ResultCache

            cache = cache or ResultCache(root)
            meta = model_meta(results, tuned)
            for result in found:
                path = cache.get_task_result_path(result.task_name, meta)
                _write_task_result(result, path)
                written.append(path)
            write_json(path.parent / "model_meta.json", meta.to_dict())
            log.info("mteb results: %d TaskResult file(s) for %s (revision %s%s) under %s", len(found), meta.name,
                     meta.revision, ", before fine-tuning" if not tuned else "", path.parent)
    except Exception as e:  # results.json is written; these files are a convenience beside it
        log.warning("could not write mteb TaskResult files under %s (%s: %s); results.json holds the scores",
                    root, type(e).__name__, e)
    return written
