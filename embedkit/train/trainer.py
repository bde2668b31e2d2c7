"""Contrastive LoRA fine-tuning: one small loop shared by every run and sweep.

The model is the backbone with a peft LoRA adapter (``embedkit.train.lora``); texts are wrapped in the
run's prompt and pooled with the run's pooling, exactly as at evaluation. Each optimizer step takes
``batch_size`` pairs (``embedkit.train.plan``) and minimises InfoNCE (``embedkit.train.losses``) with one
of two negative schemes:

- ``negatives: full`` (default): GradCache (``embedkit.train.gradcache``). All embeddings of the batch are
  computed without a graph in chunks of ``chunk_size`` pairs, the loss over the full ``batch_size``-way
  similarity matrix is back-propagated to the embeddings, and each chunk is re-encoded with the same random
  state and back-propagated with those gradients. Every loss sees all in-batch negatives at the memory of
  one chunk, for about 1.3-1.5x the compute of one pass.
- ``negatives: chunk``: plain gradient accumulation over chunks, each loss seeing only ``chunk_size``-way
  negatives. The paper's setting is ``batch_size=120, chunk_size=12`` with this scheme.

Distributed (``torchrun --nproc_per_node N -m embedkit.commands.embed train=lora ...``): each rank takes its
own slice of every batch, embeddings are all-gathered (with gradients) so the loss sees the global batch,
and LoRA gradients are all-reduced (``embedkit.train.distributed``). Checkpoints (adapter + optimizer +
scheduler + RNG + step) are written atomically every ``save_every`` steps under a folder keyed by the
training configuration, so running the same command again with ``train.resume=true`` continues where it
stopped. A wall-time budget (``train.max_minutes``) ends the loop after the step during which it ran out,
with a checkpoint there; the LR schedule stays planned for ``total_steps`` (a resumed run continues it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from embedkit.data.pairs import PairSet
from embedkit.embed.encoder import takes_position_ids
from embedkit.embed.models import Backbone
from embedkit.embed.pooling import Pooling
from embedkit.embed.prompts import Prompt
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_dir
from embedkit.runtime import memory_gib, reset_peak_memory
from embedkit.train.config import TrainConfig
from embedkit.train.distributed import all_gather_with_grad, average_gradients, chunk_groups, rank_and_world, rank_slices
from embedkit.train.gradcache import Embeddings, GradCache, rng_state
from embedkit.train.lora import autocast_dtype, embed_sequences, make_lora_model, train_packing
from embedkit.train.losses import info_nce
from embedkit.train.plan import TrainingPlan

log = logging.getLogger(__name__)

FIT_PROBE_STEPS = 5  # train.fit_budget times this many steps (the first not counted) before it re-plans

__all__ = ["Trainer"]


def _candidates(n: int, partition: str) -> int:
    """The softmax's candidates per anchor for ``n`` pairs in one loss: the n positives, or with GTE's
    partition also the n - 1 other anchors, the n anchors against the positive and the n - 1 other positives."""
    return n if partition == "positives" else 4 * n - 2


class Trainer:
    """Fine-tunes a LoRA adapter on a copy of ``backbone`` with InfoNCE over in-batch negatives.

    Takes the backbone, the prompt and pooling of the run, the pairs, the ``TrainConfig``, an optimizer
    factory (trainable parameters -> ``torch.optim.Optimizer``), an optional logger (``.log(row, step)``,
    ``.table``), the checkpoint folder (``None``: no checkpoints), the seed of the batch order and of the
    dropout masks, and ``plan``: the ``TrainingPlan`` of these pairs if the caller built it already (it
    must be of the same tokenizer, prompt, pairs, config, seed and world size); without one it is built
    here. ``fit()`` trains and returns the summary that ``results.json`` holds under ``train``.
    """

    def __init__(self, backbone: Backbone, prompt: Prompt, pooling: Pooling, pairs: PairSet, cfg: TrainConfig,
                 optimizer_factory, logger=None, checkpoint_dir: Path | None = None, seed: int = 0,
                 show_progress: bool = True, plan: TrainingPlan | None = None) -> None:
        self.rank, self.world = rank_and_world()
        if plan is None:  # pairs that teach nothing stop here, before the model is copied
            plan = TrainingPlan(backbone.tokenizer, prompt, pairs, cfg, seed, self.world)
        elif not (plan.tokenizer is backbone.tokenizer and plan.prompt == prompt and plan.pairs == pairs
                  and plan.cfg == cfg and plan.seed == seed and plan.world == self.world):
            raise ValueError("Trainer: the plan was built for another tokenizer, prompt, pairs, config, seed "
                             "or world size")
        self.plan, self.cfg, self.prompt, self.pairs, self.seed = plan, cfg, prompt, pairs, seed
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps
        self.pooling, self.logger, self.show_progress = pooling, logger, show_progress
        self.tokenizer, self.device, self.base_name = backbone.tokenizer, backbone.device, backbone.name
        self.model = make_lora_model(backbone, cfg, pooling)
        self.position_ids = takes_position_ids(self.model)
        self.packed = train_packing(cfg.packing, self.device, self.position_ids)
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.optimizer = optimizer_factory(self.trainable_parameters())
        self.scheduler = self._schedule(self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.gradcache = GradCache(self.embed_pairs, self._batch_loss, self._backward, self.device)
        self.checkpoint_dir = checkpoint_dir
        self.step = 0
        self.budget_fit: dict | None = None  # train.fit_budget: the timing and the steps it planned
        self.history: list[dict] = []
        self.false_negatives = 0
        self.grad_norm = float("nan")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train (the LoRA matrices)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def peak_memory_gib(self) -> float:
        """Peak memory in GiB since ``fit`` started (or since the caller's last ``reset_peak_memory``): on
        CUDA the most allocated on the training device; on CPU the peak RSS of the process (Linux; elsewhere
        since the process started)."""
        return memory_gib(self.device, peak=True)

    # -- the loop ---------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from step 0 (or, with ``train.resume``, from the newest checkpoint) to ``total_steps``, or
        until the step during which ``train.max_minutes`` ran out (a checkpoint is written there too);
        returns the summary (steps made and planned, ``stopped_by``: ``steps`` or ``budget``, losses, speed,
        memory, negatives, false negatives, pairs)."""
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        elif self.checkpoint_dir is not None and self._checkpoints():
            log.warning("checkpoints exist in %s; starting over (set train.resume=true to continue)",
                        self.checkpoint_dir)
        if self.step == 0:
            torch.manual_seed(self.seed)  # dropout masks; a resumed run restores the saved random state
        start_step, t0, pairs_seen = self.step, time.perf_counter(), 0
        reset_peak_memory(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.show_progress or self.rank != 0, dynamic_ncols=True)
        loss, stopped_by, times = float("nan"), "steps", []
        while self.step < self.total_steps:
            epoch, batch = self.plan.epoch(self.step), self.plan.batch(self.step)  # batch
            t = time.perf_counter()
            loss = self.train_step(batch)                                         # forward/backward, clip, step
            dt = time.perf_counter() - t
            pairs_seen += len(batch)
            times.append(dt)
            if cfg.fit_budget and self.budget_fit is None and len(times) == min(FIT_PROBE_STEPS, self.total_steps):
                self.fit_to_budget(t0, times)                                     # re-plan for the budget
                bar.total = self.total_steps
            row = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],  # log
                   "train/grad_norm": self.grad_norm, "train/pairs_per_s": len(batch) / dt,
                   "train/memory_gib": memory_gib(self.device), "train/epoch": epoch}
            self.history.append({"step": self.step, **row})
            if self.logger is not None and self.rank == 0:
                self.logger.log(row, step=self.step)
            bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{len(batch) / dt:.1f}")
            bar.update(1)
            if self.step < self.total_steps and self.out_of_time(t0):             # time budget (train.max_minutes)
                stopped_by = "budget"
            if self.checkpoint_dir is not None and (self.step % cfg.save_every == 0 or self.step == self.total_steps
                                                    or stopped_by == "budget"):
                self.save_checkpoint()                                            # checkpoint
            if stopped_by == "budget":
                log.warning("train.max_minutes=%g ran out: stopped after step %d of %d (%.1f s); checkpoint and "
                            "adapter saved as at a normal end. The LR schedule was planned for %d steps and stops "
                            "at lr %.3g; train.resume=true continues it", cfg.max_minutes, self.step,
                            self.total_steps, time.perf_counter() - t0, self.total_steps,
                            self.scheduler.get_last_lr()[0])
                break
        bar.close()
        wall = time.perf_counter() - t0
        if self.false_negatives:
            log.warning("masked %d false-negative pairs (identical anchors or positives in one batch)",
                        self.false_negatives)
        return {"steps": self.step, "steps_planned": self.total_steps, "stopped_by": stopped_by,
                "budget_fit": self.budget_fit,
                "max_minutes": cfg.max_minutes, "steps_this_run": self.step - start_step,
                "resumed_from": start_step or None,
                "pairs_seen": self.step * cfg.batch_size, "final_loss": loss,
                "first_loss": self.history[0]["train/loss"] if self.history else None,
                "wall_s": round(wall, 2), "pairs_per_s": round(pairs_seen / wall, 2) if wall else None,
                "peak_memory_gib": self.peak_memory_gib(), "negatives": cfg.negatives,
                "negatives_per_loss": _candidates(cfg.batch_size if cfg.negatives == "full" else cfg.chunk_size,
                                                  cfg.partition),
                "false_negatives_masked": self.false_negatives, "world_size": self.world,
                "autocast": str(self.dtype).removeprefix("torch.") if self.dtype else "fp32",
                "pairs": self.pairs.describe()}

    def _schedule(self, total_steps: int):
        from transformers import get_scheduler  # transformers loads only once a model trains

        return get_scheduler(self.cfg.scheduler, self.optimizer, num_warmup_steps=self.cfg.warmup_steps,
                             num_training_steps=total_steps)

    def fit_to_budget(self, t0: float, times: list[float]) -> None:
        """``train.fit_budget``: from the mean time of this run's steps after its first (which pays one-time
        costs), the steps the rest of ``max_minutes`` holds (2% kept in hand); the plan and the LR schedule
        are cut to them (never lengthened), the scheduler re-made and advanced to the current step. Under
        torchrun rank 0's estimate decides for every rank."""
        per_step = sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]
        left = self.cfg.max_minutes * 60 - (time.perf_counter() - t0)
        fits = int(self._rank0(self.step + max(int(left * 0.98 / per_step), 0)))
        total = max(self.step, min(self.total_steps, fits))
        self.budget_fit = {"probe_steps": len(times), "s_per_step": round(per_step, 3),
                           "steps_planned_before": self.total_steps, "steps": total}
        if total != self.total_steps:  # the schedule for ``total`` steps, advanced to this step
            self.total_steps, self.scheduler = total, self._schedule(total)
            for _ in range(self.step):
                self.scheduler.step()
        log.info("train.fit_budget: %.2f s per step, so %g minutes hold %d steps (planned %d); the LR schedule now "
                 "ends at step %d", per_step, self.cfg.max_minutes, fits, self.budget_fit["steps_planned_before"],
                 total)

    def out_of_time(self, t0: float) -> bool:
        """Whether the budget ``train.max_minutes`` (None: none) has run out since ``t0`` (``perf_counter``);
        under torchrun rank 0's clock decides for every rank, so all stop after the same step."""
        if self.cfg.max_minutes is None:
            return False
        return bool(self._rank0(time.perf_counter() - t0 >= self.cfg.max_minutes * 60))

    def _rank0(self, value: float) -> float:
        """``value`` as rank 0 has it (under torchrun every rank then decides alike; alone: ``value``)."""
        if self.world == 1:
            return value
        flag = torch.tensor([float(value)], device=self.device)
        dist.broadcast(flag, src=0)
        return flag.item()

    def train_step(self, batch: list[int]) -> float:
        """One optimizer step on the pairs ``batch`` (global indices; each rank takes its slice): forward and
        backward, gradient clipping, optimizer and scheduler step. Returns the loss; raises
        ``EmbedkitError`` (before the optimizer step) if it is not finite."""
        loss = self.accumulate_gradients(batch)  # forward/backward: GradCache or accumulation
        if not math.isfinite(loss):
            raise EmbedkitError(f"the loss became {loss} at step {self.step + 1}; no checkpoint was written for "
                                "it. Lower optimizer.lr, use train.precision=fp32, or check the pairs")
        if self.scaler is not None:  # clip
            self.scaler.unscale_(self.optimizer)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.max_grad_norm))
        if self.scaler is not None:  # optimizer and scheduler step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def accumulate_gradients(self, batch: list[int]) -> float:
        """Forward and backward for one batch (GradCache, plain accumulation or one pass, as configured);
        the gradients (averaged over ranks) are left in ``.grad``. Returns the loss."""
        self.model.train()
        loss = self._accumulate(batch) if self.cfg.negatives == "chunk" else self._full_batch(batch)
        average_gradients(self.model.parameters(), self.world)
        return loss

    def _full_batch(self, batch: list[int]) -> float:
        """``negatives: full``: one loss over the global batch; one pass if this rank's slice fits a chunk,
        else GradCache over its chunks (pairs of similar length together)."""
        if len(batch) // self.world > self.cfg.chunk_size:
            batch = self.plan.length_sorted(batch)
        chunks = self._chunks(rank_slices(batch, self.world)[self.rank])
        exclude = self._exclude(batch)
        if len(chunks) > 1:
            return self.gradcache(chunks, exclude=exclude)
        loss = self._batch_loss(*self.embed_pairs(chunks[0]), exclude=exclude)
        self._backward(loss)
        return float(loss.detach())

    def _accumulate(self, batch: list[int]) -> float:
        """``negatives: chunk``: each chunk is its own small batch (with chunk k of every rank); the chunk
        losses are weighted by their share of this rank's slice."""
        local = rank_slices(batch, self.world)[self.rank]
        total = 0.0
        for chunk, seen in zip(self._chunks(local), chunk_groups(batch, self.world, self.cfg.chunk_size)):
            loss = self._batch_loss(*self.embed_pairs(chunk), exclude=self._exclude(seen))
            self._backward(loss * len(chunk) / len(local))
            total += float(loss.detach()) * len(chunk) / len(local)
        return total

    def _chunks(self, local: list[int]) -> list[list[int]]:
        size = self.cfg.chunk_size
        return [local[i:i + size] for i in range(0, len(local), size)]

    # -- embeddings and the loss ------------------------------------------------------------------------

    def embed_pairs(self, idx: list[int]) -> Embeddings:
        """The embeddings of the pairs ``idx`` (global indices) through the LoRA model, in one encoding:
        ``(anchors, positives, hard negatives or None)``, each [len(idx), D] float32."""
        reps = embed_sequences(self.model, self.plan.sequences(idx), self.pooling, self.tokenizer.pad_token_id,
                               self.device, self.dtype, self.position_ids, spans=self.plan.spans(idx),
                               attention=self.cfg.attention, packed=self.packed)
        n = len(idx)
        return reps[:n], reps[n:2 * n], (reps[2 * n:] if self.plan.negative_ids is not None else None)

    def _batch_loss(self, a, p, n, exclude=None) -> torch.Tensor:
        """InfoNCE over the embeddings of every rank (all-gathered in rank order)."""
        c, gather = self.cfg, all_gather_with_grad
        return info_nce(gather(a), gather(p), c.temperature, negatives=None if n is None else gather(n),
                        symmetric=c.symmetric, margin=c.margin, exclude=exclude, partition=c.partition,
                        hardness=c.hardness)

    def _exclude(self, idx: list[int]) -> torch.Tensor | None:
        """Off-diagonal pairs with the same anchor or positive text: false negatives, masked out."""
        if not self.cfg.mask_false_negatives:
            return None
        ex = self.plan.same_text(idx)
        self.false_negatives += int(ex.sum()) // 2
        return ex.to(self.device)

    def _backward(self, x: torch.Tensor) -> None:
        (self.scaler.scale(x) if self.scaler is not None else x).backward()

    # -- checkpoints --------------------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "state.pt").exists())

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint_dir/step-N`` atomically (adapter, optimizer, scheduler, RNG, scaler,
        history) and keep the newest ``keep_checkpoints``; returns its path (``None`` on ranks > 0)."""
        if self.rank != 0:
            return None
        target = self.checkpoint_dir / f"step-{self.step:07d}"
        with atomic_dir(target) as tmp:  # a checkpoint folder is complete or absent
            self.model.save_pretrained(tmp / "adapter")
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.device),
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "history": self.history, "false_negatives": self.false_negatives,
                        "budget_fit": self.budget_fit}, tmp / "state.pt")
        for old in self._checkpoints()[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _resume(self) -> None:
        found = self._checkpoints()
        if not found:
            log.info("train.resume=true but no checkpoint in %s; starting from step 0", self.checkpoint_dir)
            return
        from peft import set_peft_model_state_dict  # peft and safetensors load only once a model trains
        from safetensors.torch import load_file

        last = found[-1]
        weights = load_file(str(last / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, weights)
        state = torch.load(last / "state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("budget_fit"):  # the schedule as fitted by the first run
            self.budget_fit = state["budget_fit"]
            self.total_steps = self.budget_fit["steps"]
            self.scheduler = self._schedule(self.total_steps)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        self.false_negatives = state["false_negatives"]
        torch.set_rng_state(state["rng"][0].cpu())
        if state["rng"][1] is not None:
            torch.cuda.set_rng_state(state["rng"][1].cpu(), self.device)
        log.info("resumed from %s (step %d of %d)", last, self.step, self.total_steps)

    # -- the result -----------------------------------------------------------------------------------------

    def save_adapter(self, folder: Path) -> Path:
        """The final adapter (peft format), written atomically; load it with ``model.adapter=<folder>``."""
        if self.rank == 0:
            with atomic_dir(folder) as tmp:
                self.model.save_pretrained(tmp)
                (tmp / "embedkit.json").write_text(json.dumps(
                    {"base_model": self.base_name, "prompt": self.prompt.template, "pooling": self.pooling.mode,
                     "max_length": self.cfg.max_length, "steps": self.step}, indent=2))
        if self.world > 1:
            dist.barrier()  # the other ranks read the adapter after rank 0 wrote it
        return folder

    def tuned_backbone(self, backbone: Backbone, adapter_dir: Path) -> Backbone:
        """The fine-tuned model as a backbone for the evaluator (own fingerprint: own embedding cache).
        The adapter is merged into a copy of the weights, so encoding costs what the base model costs."""
        self.model.eval()
        merged = copy.deepcopy(self.model).merge_and_unload().eval()
        digest = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
        return Backbone(name=backbone.name, source=backbone.source, model=merged, tokenizer=self.tokenizer,
                        dtype=backbone.dtype, device=backbone.device, adapter=str(adapter_dir),
                        info={**backbone.info, "adapter_sha256": digest})
