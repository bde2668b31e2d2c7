"""One run: config -> build (prompt, pooling, data, evaluator, model) -> encode + evaluate -> results.

Cheap objects are built and validated first, so bad input stops the run before any model work.
``results.json`` is written atomically into the run folder; the logger is always closed.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embedkit.embed.encoder import Encoder
from embedkit.io import write_json
from embedkit.runtime import git_commit, seed_everything, versions
from embedkit.loggers import NullLogger
from embedkit.io import check_writable
from embedkit.schema import validate

log = logging.getLogger(__name__)

def run(cfg: DictConfig, run_dir: Path, group: str | None = None, job: int = 0) -> dict:
    """Evaluate one configuration; returns the dict written to ``run_dir/results.json``."""
    t0 = time.perf_counter()
    validate(cfg)  # types, ranges and keys of the whole config, before anything is built
    seed_everything(cfg.seed)
    prompt = instantiate(cfg.prompt)
    pooling = instantiate(cfg.pooling)
    evaluator = instantiate(cfg.eval)
    sets = instantiate(cfg.data)
    training = cfg.train.name != "none"
    if training:
        from embedkit.train.trainer import TrainConfig

        train_cfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
        pairs = instantiate(cfg.pairs)
        optimizer_factory = instantiate(cfg.optimizer)
    elif cfg.augmentation.name != "none":
        log.warning("augmentation=%s has no effect without fine-tuning (train=lora)", cfg.augmentation.name)
    check_writable(run_dir, cfg.paths.get("min_free_mb", 0))
    t_data = time.perf_counter()
    names = f"model={cfg.model.name or cfg.model.name_or_path} prompt={prompt.name} pooling={pooling.name}"
    log.info("run %s on %d task(s): %s", names, len(sets), ", ".join(s.name for s in sets))

    config = OmegaConf.to_container(cfg, resolve=True)
    from embedkit.train.trainer import rank_and_world

    main_process = rank_and_world()[0] == 0  # under torchrun only rank 0 logs and writes results
    logger = instantiate(cfg.logger) if main_process else NullLogger()
    logger.start(config, name=run_dir.name, group=group, job_type="train" if training else "eval", run_dir=run_dir)
    failed = True
    try:
        backbone = instantiate(cfg.model, show_progress=cfg.encode.show_progress)
        t_model = time.perf_counter()
        make_encoder = lambda bb: Encoder(  # noqa: E731
            bb, prompt, max_length=cfg.encode.max_length, batch_size=cfg.encode.batch_size,
            max_tokens=cfg.encode.max_tokens, show_progress=cfg.encode.show_progress,
            cache_dir=cfg.paths.embedding_cache if cfg.encode.cache else None, compile=cfg.encode.compile)
        if training:  # pairs that would train on nothing stop the run before any encoding
            from embedkit.train.trainer import Trainer

            if cfg.augmentation.name != "none":
                pairs = augment_pairs(cfg, pairs)
            Trainer.check_input(backbone, prompt, pairs, train_cfg, seed=cfg.seed)
        encoder = make_encoder(backbone)
        scores = evaluator.evaluate(encoder, pooling, sets)
        from_cache = {"scores": list(evaluator.cached_tasks)}
        extra = {}
        if training:
            extra, backbone = fine_tune(cfg, train_cfg, backbone, prompt, pooling, pairs, optimizer_factory,
                                        logger, run_dir)
            extra["scores_before"], extra["mean_before"] = scores, float(np.mean(list(scores.values())))
            encoder = make_encoder(backbone)
            scores = evaluator.evaluate(encoder, pooling, sets)
            from_cache = {"scores": list(evaluator.cached_tasks), "scores_before": from_cache["scores"]}
            log.info("fine-tuning moved the mean V-measure from %.4f to %.4f", extra["mean_before"],
                     float(np.mean(list(scores.values()))))
        t_eval = time.perf_counter()
        results = {
            "model": backbone.name,
            "model_source": backbone.source,
            "adapter": backbone.adapter,
            "prompt": prompt.name,
            "prompt_template": prompt.template,
            "pooling": pooling.name,
            "scores": scores,
            "mean": float(np.mean(list(scores.values()))),
            "tasks": {s.name: s.describe() for s in sets},
            **extra,
            "eval": evaluator.describe(),
            "from_cache": from_cache,  # task names whose score was read from the result cache (eval.cache)
            "encode": {"dtype": str(backbone.dtype).removeprefix("torch."), "device": str(backbone.device),
                       "max_length": encoder.max_length, "batch_size": encoder.batch_size,
                       "max_tokens": encoder.max_tokens, "forward_calls": encoder.forward_calls,
                       "texts_encoded": encoder.texts_encoded, "cache_hits": encoder.cache_hits},
            "timings": {"data_s": round(t_data - t0, 3), "model_load_s": round(t_model - t_data, 3),
                        "encode_eval_s": round(t_eval - t_model, 3),
                        "total_s": round(time.perf_counter() - t0, 3)},
            "seed": cfg.seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir),
            "sweep": group,
            "job": job,
            "config": config,
        }
        if main_process:
            write_json(run_dir / "results.json", results)
        logger.summary({"scores": scores, "mean": results["mean"], "timings": results["timings"],
                        "from_cache": len(from_cache["scores"]),
                        **{k: extra[k] for k in ("scores_before", "mean_before", "train") if k in extra}})
        logger.table("scores", ["task", "v_measure"], [[k, v] for k, v in scores.items()])
        failed = False
    finally:
        logger.finish(failed=failed)
    log.info("%s: mean V-measure %.4f over %d task(s) -> %s", names, results["mean"], len(scores),
             run_dir / "results.json")
    return results


def augment_pairs(cfg: DictConfig, pairs):
    """Replace the positives by views generated from the anchors (``augmentation`` group)."""
    from embedkit.data.pairs import PairSet

    aug = instantiate(cfg.augmentation)
    rows = aug.make_pairs(list(dict.fromkeys(pairs.anchors)), cache_dir=cfg.paths.pair_cache,
                          seed=cfg.seed)
    return PairSet(f"{pairs.name}+{aug.name}", [r["anchor"] for r in rows], [r["positive"] for r in rows],
                   None, pairs.source)


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


def checkpoint_key(cfg: DictConfig, train_cfg) -> str:
    """The checkpoint folder's key: the training settings and every config node the run trains on
    (with the ``_target_`` names of ``LEGACY_TARGETS``, so keys survive code moves)."""
    parts = [_legacy_targets(OmegaConf.to_container(cfg[k], resolve=True))
             for k in ("model", "prompt", "pooling", "pairs", "augmentation", "optimizer")]
    return train_cfg.fingerprint(*parts, cfg.seed)


def fine_tune(cfg: DictConfig, train_cfg, backbone, prompt, pooling, pairs, optimizer_factory, logger, run_dir):
    """Train a LoRA adapter with the shared trainer; returns (results fields, tuned backbone)."""
    from embedkit.train.trainer import Trainer

    key = checkpoint_key(cfg, train_cfg)
    checkpoint_dir = Path(cfg.paths.output_root) / "checkpoints" / f"{backbone.name}-{train_cfg.name}-{key}"
    trainer = Trainer(backbone, prompt, pooling, pairs, train_cfg, optimizer_factory, logger=logger,
                      checkpoint_dir=checkpoint_dir, seed=cfg.seed, show_progress=cfg.encode.show_progress)
    log.info("fine-tuning %s on %d pairs of %s: %d steps of %d pairs (%s negatives, chunks of %d)", backbone.name,
             len(pairs), pairs.name, trainer.total_steps, train_cfg.batch_size, train_cfg.negatives,
             train_cfg.chunk_size)
    summary = trainer.fit()
    adapter = trainer.save_adapter(run_dir / "adapter")
    summary["checkpoint_dir"] = str(checkpoint_dir)
    logger.table("train_loss", ["step", "loss"], [[h["step"], h["train/loss"]] for h in trainer.history])
    tuned = trainer.tuned_backbone(backbone, adapter)
    out = {"train": summary, "adapter_dir": str(adapter)}
    if train_cfg.export:
        from embedkit.train.export import export_sentence_transformers

        out["sentence_transformers_dir"] = str(export_sentence_transformers(
            tuned, prompt, pooling, cfg.encode.max_length, run_dir / "sentence-transformers"))
    return out, tuned
