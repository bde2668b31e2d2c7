"""One run of the ``embedkit`` command, as a short list of named steps (``run``):

1. ``build``: validate the whole config, then build every cheap object (prompt, pooling, evaluator, data
   and, for ``train=lora``, the training settings, pairs and optimizer), so bad input stops the run
   before any model work;
2. ``logged``: open the logger; it is closed in this one place, also when a step fails;
3. load the model, and for training ``plan_training`` (augmentation, then the ``TrainingPlan`` that
   tokenizes the pairs once and refuses pairs that teach nothing, still before any encoding);
4. evaluate the base model; for training ``fine_tune`` it and evaluate the tuned model;
5. ``assemble_results``: the one place ``results.json``'s fields are put together; it is written
   atomically into the run folder (by rank 0 under torchrun) and its summary logged; with ``train.export``
   the sentence-transformers folder is written just before it (its model card holds these results), and
   ``train.push_to_hub`` uploads that folder last (access is checked in ``build``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embedkit.augment.sources import check_dropout_views
from embedkit.data.pairs import PairSet
from embedkit.embed.encoder import Encoder, flush_cache_writes
from embedkit.embed.peer import PeerBackbone, PeerEncoder, not_applicable
from embedkit.embed.prompts import PromptEnsemble
from embedkit.embed.states import num_blocks
from embedkit.errors import EmbedkitError
from embedkit.evaluate.mteb_results import write_mteb_results
from embedkit.io import check_writable, write_json
from embedkit.loggers import NullLogger, results_table, started
from embedkit.runtime import git_commit, seed_everything, versions
from embedkit.schema import check_objective, validate
from embedkit.train import TrainConfig, Trainer, TrainingPlan, export_sentence_transformers, rank_and_world
from embedkit.train.export import check_exportable
from embedkit.train.hub import check_hub_access, push_folder
from embedkit.train.model_card import run_command

__all__ = ["Built", "LEGACY_TARGETS", "Training", "assemble_results", "augment_pairs", "build", "checkpoint_key", "fine_tune",
           "logged", "make_encoder", "plan_training", "run"]

log = logging.getLogger(__name__)


@dataclass
class Training:
    """What ``train=lora`` adds to a run: the settings, the pairs, the optimizer factory, and (after
    ``plan_training``) the pairs' ``TrainingPlan``."""

    cfg: TrainConfig
    pairs: PairSet
    optimizer_factory: object
    plan: TrainingPlan | None = None


@dataclass
class Built:
    """The cheap objects of a run, built (and so checked) before any model work."""

    prompt: object
    pooling: object
    evaluator: object
    sets: list
    training: Training | None


def build(cfg: DictConfig) -> Built:
    """Validate ``cfg`` (types, ranges, keys) and instantiate everything that needs no model."""
    validate(cfg)
    seed_everything(cfg.seed)
    built = Built(instantiate(cfg.prompt), instantiate(cfg.pooling), instantiate(cfg.eval), instantiate(cfg.data),
                  training=None)
    if cfg.train.name != "none":
        train_cfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
        check_dropout_views(cfg.augmentation, cfg.pairs, train_cfg.model_dropout)  # SimCSE views need dropout
        built.training = Training(train_cfg, instantiate(cfg.pairs), instantiate(cfg.optimizer))
    elif cfg.augmentation.name != "none":
        log.warning("augmentation=%s has no effect without fine-tuning (train=lora)", cfg.augmentation.name)
    check_levers(built)
    if built.training is not None and built.training.cfg.push_to_hub:  # offline or no token: refused before training
        check_hub_access(built.training.cfg.push_to_hub)
    check_objective(cfg.get("optimized_metric"), built.training is not None, [s.name for s in built.sets])
    return built


def check_levers(built: Built) -> None:
    """Prompt and pooling levers that cannot work together, or that look like a mistake, before model
    work: an ensemble in training, ``per_task`` patterns that match no task."""
    prompt, pooling = built.prompt, built.pooling
    if isinstance(prompt, PromptEnsemble) and built.training is not None:
        raise EmbedkitError(f"prompt={prompt.name} is an ensemble of {len(prompt.members)} prompts: fine-tuning "
                            "trains one prompt; pick one member (e.g. prompt=eol) for train=lora")
    if built.training is not None and built.training.cfg.export:
        check_exportable(prompt, pooling)  # refused before training, not after it
    unmatched = prompt.unmatched_patterns([s.name for s in built.sets])
    if unmatched:
        log.warning("prompt.per_task: %s match(es) none of the tasks %s; those tasks use the run's template",
                    ", ".join(map(repr, unmatched)), ", ".join(s.name for s in built.sets))
    if pooling.span == "text" and not isinstance(prompt, PromptEnsemble) and prompt.template == "{text}":
        log.info("pooling.span=text with prompt=%s: the text is the whole input (a tokenizer's BOS is "
                 "still left out), so this is nearly span=all", prompt.name)


@contextlib.contextmanager
def logged(cfg: DictConfig, config: dict, run_dir: Path, group: str | None, training: bool,
           name: str | None = None):
    """The run's logger (a ``NullLogger`` on ranks other than 0), started here as ``name`` (default: the
    run folder's name) with the experiment's tags and the model's name, and always finished, marked failed
    when the block raises."""
    logger = instantiate(cfg.logger) if rank_and_world()[0] == 0 else NullLogger()
    tags = [*(cfg.get("tags") or []), Path(str(cfg.model.get("name") or cfg.model.get("name_or_path"))).name]
    with started(logger, config, name or run_dir.name, group, "train" if training else "eval", run_dir, tags):
        yield logger


def make_encoder(cfg: DictConfig, backbone, prompt) -> Encoder | PeerEncoder:
    """The encoder of the ``encode`` block, with the embedding cache when ``encode.cache`` is on (a
    ``PeerEncoder`` for a sentence-transformers peer)."""
    e = cfg.encode
    if isinstance(backbone, PeerBackbone):  # a sentence-transformers model: its own tokenizer, truncation, pooling
        return PeerEncoder(backbone, batch_size=e.batch_size, show_progress=e.show_progress,
                           cache_dir=cfg.paths.embedding_cache if e.cache else None)
    return Encoder(backbone, prompt, max_length=e.max_length, batch_size=e.batch_size, max_tokens=e.max_tokens,
                   show_progress=e.show_progress, cache_dir=cfg.paths.embedding_cache if e.cache else None,
                   compile=e.compile, layers=e.layers, packing=e.packing)


def augment_pairs(cfg: DictConfig, pairs: PairSet) -> PairSet:
    """Replace the positives by views generated from the anchors (``augmentation`` group)."""
    aug = instantiate(cfg.augmentation)
    rows = aug.make_pairs(list(dict.fromkeys(pairs.anchors)), cache_dir=cfg.paths.pair_cache, seed=cfg.seed)
    return PairSet(f"{pairs.name}+{aug.name}", [r["anchor"] for r in rows], [r["positive"] for r in rows],
                   None, pairs.source)


def plan_training(cfg: DictConfig, backbone, prompt, training: Training) -> Training:
    """Augment the pairs if asked, then tokenize them and plan every step's batch once; pairs with no
    training signal stop the run here, before any encoding."""
    pairs = augment_pairs(cfg, training.pairs) if cfg.augmentation.name != "none" else training.pairs
    plan = TrainingPlan(backbone.tokenizer, prompt, pairs, training.cfg, seed=cfg.seed)
    return Training(training.cfg, pairs, training.optimizer_factory, plan)


# Config targets as they were spelled before the stage packages: the checkpoint key hashes the config
# nodes, targets included, so a moved target is hashed under its old name and old checkpoints resume.
LEGACY_TARGETS = {
    "embedkit.embed.load_backbone": "embedkit.models.load_backbone",
    "embedkit.embed.Prompt": "embedkit.prompts.Prompt",
    "embedkit.embed.Pooling": "embedkit.pooling.Pooling",
    "embedkit.data.load_pairs": "embedkit.pairs.load_pairs",
    "embedkit.data.stdlib_pairs": "embedkit.pairs.stdlib_pairs",
}


def _legacy_targets(node):
    if isinstance(node, dict):
        return {k: LEGACY_TARGETS.get(v, v) if k == "_target_" else _legacy_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_legacy_targets(v) for v in node]
    return node


# Keys added to config nodes after checkpoints existed, with the value that means "as before": left out of
# the checkpoint key when they hold it, so old checkpoints keep resuming.
ADDED_KEYS = {"pooling": {"layer": -1, "span": "all", "final_norm": "auto"}, "prompt": {"per_task": {}}}


def _without_defaults(group: str, node):
    added = ADDED_KEYS.get(group, {})
    return {k: v for k, v in node.items() if not (k in added and (v == added[k] or (v is None and added[k] == {})))}


def checkpoint_key(cfg: DictConfig, train_cfg: TrainConfig) -> str:
    """The checkpoint folder's key: the training settings and every config node the run trains on
    (with the ``_target_`` names of ``LEGACY_TARGETS``, so keys survive code moves)."""
    parts = [_legacy_targets(_without_defaults(k, OmegaConf.to_container(cfg[k], resolve=True)))
             for k in ("model", "prompt", "pooling", "pairs", "augmentation", "optimizer")]
    return train_cfg.fingerprint(*parts, cfg.seed)


def fine_tune(cfg: DictConfig, training: Training, backbone, prompt, pooling, logger, run_dir: Path):
    """Train a LoRA adapter with the shared trainer on the planned pairs; returns (results fields, tuned
    backbone). Checkpoints go to ``paths.checkpoints/<model>-<train>-<checkpoint key>``."""
    train_cfg, pairs = training.cfg, training.pairs
    checkpoint_dir = Path(cfg.paths.checkpoints) / f"{backbone.name}-{train_cfg.name}-{checkpoint_key(cfg, train_cfg)}"
    trainer = Trainer(backbone, prompt, pooling, pairs, train_cfg, training.optimizer_factory, logger=logger,
                      checkpoint_dir=checkpoint_dir, seed=cfg.seed, show_progress=cfg.encode.show_progress,
                      plan=training.plan)
    log.info("fine-tuning %s on %d pairs of %s: %d steps of %d pairs (%s negatives, chunks of %d)", backbone.name,
             len(pairs), pairs.name, trainer.total_steps, train_cfg.batch_size, train_cfg.negatives,
             train_cfg.chunk_size)
    summary = trainer.fit()
    adapter = trainer.save_adapter(run_dir / "adapter")
    summary["checkpoint_dir"] = str(checkpoint_dir)
    logger.table("train_loss", ["step", "loss"], [[h["step"], h["train/loss"]] for h in trainer.history])
    tuned = trainer.tuned_backbone(backbone, adapter)
    out = {"train": summary, "adapter_dir": str(adapter)}
    if train_cfg.export:  # written by ``run`` once the tuned model's scores are known (they go in its model card)
        out["sentence_transformers_dir"] = str(run_dir / "sentence-transformers")
    return out, tuned


def assemble_results(cfg: DictConfig, config: dict, built: Built, backbone, encoder: Encoder, scores: dict,
                     extra: dict, from_cache: dict, timings: dict, run_dir: Path, group: str | None,
                     job: int) -> dict:
    """The fields of ``results.json``, in their order (see README "What each run writes")."""
    return {
        "model": backbone.name,
        "model_source": backbone.source,
        "adapter": backbone.adapter,
        "prompt": built.prompt.name,
        "prompt_template": built.prompt.template,
        "pooling": built.pooling.name,
        "pooling_spec": built.pooling.describe() if isinstance(backbone, PeerBackbone)  # a peer: its own pooling
        else {**built.pooling.describe(),
              "layers_resolved": list(built.pooling.resolve_layers(num_blocks(backbone.model)))},
        **({"prompt_members": [m.template for m in built.prompt.members]}
           if isinstance(built.prompt, PromptEnsemble) else {}),
        **({"prompt_per_task": {s.name: built.prompt.for_task(s.name).template for s in built.sets}}
           if built.prompt.per_task else {}),
        "scores": scores,
        "mean": float(np.mean(list(scores.values()))),
        "tasks": {s.name: s.describe() for s in built.sets},
        **extra,
        "eval": built.evaluator.describe(),
        "from_cache": from_cache,  # task names whose score was read from the result cache (eval.cache)
        "encode": {"dtype": str(backbone.dtype).removeprefix("torch."), "device": str(backbone.device),
                   "max_length": encoder.max_length, "batch_size": encoder.batch_size,
                   "max_tokens": encoder.max_tokens, "forward_calls": encoder.forward_calls,
                   "texts_encoded": encoder.texts_encoded, "cache_hits": encoder.cache_hits},
        "timings": timings,
        "seed": cfg.seed,
        "versions": versions(),
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "sweep": group,
        "job": job,
        "config": config,
    }


def run(cfg: DictConfig, run_dir: Path, group: str | None = None, job: int = 0, name: str | None = None) -> dict:
    """Evaluate (and with ``train=lora`` fine-tune, then evaluate again) one configuration; returns the
    dict written to ``run_dir/results.json``. ``group`` (the sweep) and ``name`` label the logger's run."""
    t0 = time.perf_counter()
    built = build(cfg)
    check_writable(run_dir, cfg.paths.get("min_free_mb", 0))
    t_data = time.perf_counter()
    names = f"model={cfg.model.name or cfg.model.name_or_path} prompt={built.prompt.name} pooling={built.pooling.name}"
    log.info("run %s on %d task(s): %s", names, len(built.sets), ", ".join(s.name for s in built.sets))
    config = OmegaConf.to_container(cfg, resolve=True)

    with logged(cfg, config, run_dir, group, training=built.training is not None, name=name) as logger:
        backbone = instantiate(cfg.model, show_progress=cfg.encode.show_progress)
        extra = {}
        if isinstance(backbone, PeerBackbone):  # results record prompt n/a and the model's own pooling
            built.prompt, built.pooling = not_applicable(backbone, built.prompt, built.pooling, cfg.encode.max_length)
            extra["peer"] = backbone.describe()
            names = f"model={backbone.name} (sentence-transformers peer)"
        else:
            built.pooling.views(num_blocks(backbone.model))  # a layer out of range stops here, before any encoding
        t_model = time.perf_counter()
        training = plan_training(cfg, backbone, built.prompt, built.training) if built.training else None

        encoder = make_encoder(cfg, backbone, built.prompt)
        scores = built.evaluator.evaluate(encoder, built.pooling, built.sets)
        from_cache = {"scores": list(built.evaluator.cached_tasks)}
        if training:
            extra, backbone = fine_tune(cfg, training, backbone, built.prompt, built.pooling, logger, run_dir)
            extra["scores_before"], extra["mean_before"] = scores, float(np.mean(list(scores.values())))
            encoder = make_encoder(cfg, backbone, built.prompt)
            scores = built.evaluator.evaluate(encoder, built.pooling, built.sets)
            from_cache = {"scores": list(built.evaluator.cached_tasks), "scores_before": from_cache["scores"]}
            log.info("fine-tuning moved the mean V-measure from %.4f to %.4f", extra["mean_before"],
                     float(np.mean(list(scores.values()))))
        flush_cache_writes()  # the embedding-cache files of this run are on disk before it reports
        t_eval = time.perf_counter()

        timings = {"data_s": round(t_data - t0, 3), "model_load_s": round(t_model - t_data, 3),
                   "encode_eval_s": round(t_eval - t_model, 3), "total_s": round(time.perf_counter() - t0, 3)}
        results = assemble_results(cfg, config, built, backbone, encoder, scores, extra, from_cache, timings,
                                   run_dir, group, job)
        if rank_and_world()[0] == 0:  # under torchrun only rank 0 writes results
            if "sentence_transformers_dir" in results:  # the export, its model card holding these results
                export_sentence_transformers(backbone, built.prompt, built.pooling, cfg.encode.max_length,
                                             results["sentence_transformers_dir"], results, run_command(),
                                             training.cfg.push_to_hub)
            write_json(run_dir / "results.json", results)
            write_mteb_results(results, cfg.paths.get("mteb_results"))  # registry tasks only; warns, never fails
        logger.summary({"scores": scores, "mean": results["mean"], "timings": timings,
                        "from_cache": len(from_cache["scores"]),
                        **{k: extra[k] for k in ("scores_before", "mean_before", "train", "peer") if k in extra}})
        logger.table("scores", *results_table([results]))  # per task: score (before), model, prompt, pooling
        if training and training.cfg.push_to_hub and rank_and_world()[0] == 0:  # after results.json: nothing lost
            log.info("uploaded %s to %s", results["sentence_transformers_dir"],
                     push_folder(results["sentence_transformers_dir"], training.cfg.push_to_hub))
    log.info("%s: mean V-measure %.4f over %d task(s) -> %s", names, results["mean"], len(scores),
             run_dir / "results.json")
    return results
