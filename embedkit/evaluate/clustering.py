"""Evaluation through mteb 2.x: local clustering sets become mteb tasks, the encoder an mteb model.

``legacy`` scoring is mteb's ``AbsTaskClusteringLegacy`` (the classic MTEB(eng, v1) clustering
evaluator: mini-batch k-means with k = number of labels on all documents, V-measure), which is what the
paper's numbers are comparable with. ``v2`` is ``AbsTaskClustering`` with every document embedded
(mteb's default embeds only 4%). The evaluator name is recorded in every result.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from typing import Any

import numpy as np

from embedkit.data.clustering import ClusteringSet
from embedkit.data.mteb import MtebTask, import_mteb
from embedkit.embed.encoder import Encoder
from embedkit.errors import EmbedkitError
from embedkit.embed.pooling import Pooling
from embedkit.evaluate.result_cache import ResultCache

log = logging.getLogger(__name__)

EVALUATORS = ("legacy", "v2")


def _mteb_version() -> str | None:
    try:
        return importlib.metadata.version("mteb")
    except importlib.metadata.PackageNotFoundError:
        return None


def content_digest(cs: ClusteringSet) -> str:
    """SHA-256 of a set's texts and labels, in order (its "revision" for mteb and the result cache)."""
    return hashlib.sha256("\n".join(f"{t}\t{l}" for t, l in zip(cs.texts, cs.labels)).encode()).hexdigest()


def mteb_task(cs: ClusteringSet, evaluator: str = "legacy", seed: int = 42):
    """An mteb clustering task holding ``cs`` as its test split (no download)."""
    import_mteb()  # imported with its warnings silenced
    from datasets import Dataset, DatasetDict
    from mteb.abstasks import AbsTaskClustering, AbsTaskClusteringLegacy
    from mteb.abstasks.task_metadata import TaskMetadata

    digest = content_digest(cs)
    label_ids = {lab: i for i, lab in enumerate(sorted(set(cs.labels)))}
    labels = [label_ids[lab] for lab in cs.labels]
    if evaluator == "legacy":
        base, rows = AbsTaskClusteringLegacy, {"sentences": [cs.texts], "labels": [labels]}
    else:
        base, rows = AbsTaskClustering, {"sentences": cs.texts, "labels": labels}
    metadata = TaskMetadata(
        name=cs.name, description=f"Local clustering set {cs.name} ({cs.source})",
        dataset={"path": cs.source or cs.name, "revision": digest[:12]}, type="Clustering", category="t2c",
        modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="v_measure",
        reference=None, date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
        dialect=None, sample_creation=None, bibtex_citation="",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = DatasetDict({"test": Dataset.from_dict(rows)})
        self.data_loaded = True

    attrs = {"metadata": metadata, "load_data": load_data}
    if evaluator == "legacy":
        # mteb builds the legacy k-means evaluator without the task's seed (it always runs k-means with
        # seed 42); hand the seed on, so eval.n_seeds > 1 really averages different k-means runs
        class SeededClusteringEvaluator(AbsTaskClusteringLegacy.evaluator):  # the task's public extension point
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**kwargs, "seed": seed})

        attrs["evaluator"] = SeededClusteringEvaluator
    if evaluator == "v2":
        attrs.update(max_fraction_of_documents_to_embed=None, max_documents_per_cluster=len(cs.texts))
    task_cls = type(f"Local_{digest[:8]}", (base,), attrs)
    return task_cls(seed=seed)


def mteb_model(encoder: Encoder, pooling: Pooling):
    """Wrap ``encoder`` + ``pooling`` as an mteb encoder with real metadata (name, revision)."""
    import_mteb()
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder

    class EmbedkitModel(AbsEncoder):
        def __init__(self) -> None:
            self.model = encoder
            bb = encoder.backbone
            ident = f"{encoder.backbone.fingerprint}-{encoder.prompt.template}-{pooling}-{encoder.max_length}"
            self.mteb_model_meta = ModelMeta(
                loader=None, name=f"embedkit/{bb.name}__{encoder.prompt.name}__{pooling.name}",
                revision=hashlib.sha256(ident.encode()).hexdigest()[:12], release_date=None,
                languages=None, n_parameters=sum(p.numel() for p in bb.model.parameters()),
                memory_usage_mb=None, max_tokens=encoder.max_length, embed_dim=None, license=None,
                open_weights=True, public_training_code=None, public_training_data=None,
                framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=False,
                training_datasets=None,
            )

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            return encoder.encode(texts, pooling, task=task_metadata.name)

    return EmbedkitModel()


def _pooling_fields(pooling: Pooling) -> dict:
    """The pooling's part of a result-cache key: only what differs from the defaults is added, so the keys
    of results cached before layers and spans existed stay the same."""
    spec = pooling.describe()
    defaults = {"layer": -1, "span": "all", "final_norm": "auto"}
    return {"mode": spec["mode"], "normalize": spec["normalize"],
            **{k: spec[k] for k, v in defaults.items() if spec[k] != v}}


class ClusteringEvaluator:
    """Scores an encoder + pooling on clustering sets: task name -> V-measure in [0, 1]."""

    def __init__(self, evaluator: str = "legacy", n_seeds: int = 1, cache: bool = False,
                 cache_dir: str | None = None, overwrite: bool = False) -> None:
        if evaluator not in EVALUATORS:
            raise EmbedkitError(f"eval.evaluator={evaluator!r}; choose one of {', '.join(EVALUATORS)}")
        if n_seeds < 1:
            raise EmbedkitError(f"eval.n_seeds must be >= 1, got {n_seeds}")
        if cache and not cache_dir:
            raise EmbedkitError("eval.cache=true needs eval.cache_dir (default ${paths.result_cache}); "
                                "set it or turn the result cache off with eval.cache=false")
        self.evaluator = evaluator
        self.n_seeds = n_seeds
        self.cache = ResultCache(cache_dir, overwrite=overwrite) if cache else None
        self.cached_tasks: list[str] = []  # tasks of the last evaluate() whose score came from the cache

    def cache_fields(self, encoder: Encoder, pooling: Pooling, cs: ClusteringSet | MtebTask) -> dict:
        """Everything one task's score depends on (see ``embedkit.evaluate.result_cache``)."""
        bb = encoder.backbone
        if isinstance(cs, MtebTask):
            meta = cs.task.metadata
            task = {"name": cs.name, "dataset": meta.dataset, "splits": list(meta.eval_splits),
                    "evaluator": type(cs.task).__name__}
        else:
            task = {"name": cs.name, "digest": content_digest(cs), "evaluator": self.describe()}
        return {"model": bb.name, "weights": bb.fingerprint, "adapter": bb.info.get("adapter_sha256", bb.adapter),
                "prompt": encoder.prompt_for(cs.name).template, "pooling": _pooling_fields(pooling),
                "max_length": encoder.max_length, "task": task, "mteb": _mteb_version()}

    def describe(self) -> dict:
        """What results.json records about the scoring: evaluator, number of k-means seeds and the seeds."""
        return {"evaluator": self.evaluator, "n_seeds": self.n_seeds,
                "kmeans_seeds": list(range(42, 42 + self.n_seeds))}

    def evaluate(self, encoder: Encoder, pooling: Pooling, sets: list[ClusteringSet | MtebTask]) -> dict[str, float]:
        """Main score per task. Local sets use this evaluator's scoring; named MTEB tasks their own
        (one run, mteb's seed), averaged over their evaluation splits and subsets."""
        mteb = import_mteb()
        model = mteb_model(encoder, pooling)
        scores = {}
        self.cached_tasks = []
        for cs in sets:
            fields = self.cache_fields(encoder, pooling, cs) if self.cache else None
            cached = self.cache.get(fields) if self.cache else None
            if cached is not None:
                scores[cs.name] = cached
                self.cached_tasks.append(cs.name)
                log.info("%s: %.4f (from the result cache; eval.overwrite=true recomputes)", cs.name, cached)
                continue
            runs = []
            for seed in range(42, 42 + (1 if isinstance(cs, MtebTask) else self.n_seeds)):  # 42: mteb's default
                task = cs.task if isinstance(cs, MtebTask) else mteb_task(cs, self.evaluator, seed)
                result = mteb.evaluate(model, task, cache=None, overwrite_strategy="always", show_progress_bar=False,
                                       encode_kwargs={"batch_size": encoder.batch_size})
                split_scores = result.task_results[0].scores
                runs.append(float(np.mean([s["main_score"] for split in task.metadata.eval_splits
                                           for s in split_scores.get(split, [])])))
            scores[cs.name] = float(np.mean(runs))
            if self.cache:
                self.cache.put(fields, scores[cs.name])
            log.info("%s: %.4f (%s)", cs.name, scores[cs.name], cs.describe())
        return scores
