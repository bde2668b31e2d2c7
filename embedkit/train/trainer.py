"""Contrastive LoRA fine-tuning: one small loop shared by every run and sweep.

The model is the backbone with a peft LoRA adapter; texts are wrapped in the run's prompt and pooled
with the run's pooling, exactly as at evaluation. Each optimizer step takes ``batch_size`` pairs and
minimises InfoNCE (``embedkit.train.losses``) with one of two negative schemes:

- ``negatives: full`` (default): GradCache (Gao et al. 2021). All embeddings of the batch are computed
  without a graph in chunks of ``chunk_size`` pairs, the loss over the full ``batch_size``-way similarity
  matrix is back-propagated to the embeddings, and each chunk is re-encoded with the same random state
  and back-propagated with those gradients. Every loss sees all in-batch negatives at the memory of one
  chunk, for about 1.3-1.5x the compute of one pass.
- ``negatives: chunk``: plain gradient accumulation over chunks, each loss seeing only ``chunk_size``-way
  negatives. The paper's setting is ``batch_size=120, chunk_size=12`` with this scheme.

Distributed (``torchrun --nproc_per_node N -m embedkit.commands.embed train=lora ...``): each rank takes its own
slice of every batch, embeddings are all-gathered (with gradients) so the loss sees the global batch,
and LoRA gradients are all-reduced. Checkpoints (adapter + optimizer + scheduler + RNG + step) are
written atomically every ``save_every`` steps under a folder keyed by the training configuration, so
running the same command again with ``train.resume=true`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from embedkit.embed.encoder import collate, last_hidden, takes_position_ids
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_dir
from embedkit.train.losses import info_nce
from embedkit.embed.models import Backbone
from embedkit.data.pairs import PairSet
from embedkit.embed.pooling import Pooling, pool_all
from embedkit.embed.prompts import Prompt, tokenize

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of the ``train`` config group (see conf/train/lora.yaml for their meaning)."""

    name: str = "lora"
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    temperature: float = 0.2
    symmetric: bool = False
    margin: float = 0.0
    batch_size: int = 120
    chunk_size: int = 12
    negatives: str = "full"
    max_length: int = 100
    max_steps: int = 100
    epochs: int = 1
    scheduler: str = "linear"
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    model_dropout: float = 0.0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    mask_false_negatives: bool = True
    export: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.negatives in ("full", "chunk"), f"train.negatives={self.negatives!r}: use 'full' or 'chunk'"),
            (self.batch_size >= 2, f"train.batch_size={self.batch_size}: in-batch negatives need >= 2"),
            (self.chunk_size >= 1, f"train.chunk_size={self.chunk_size} must be >= 1"),
            (self.max_steps >= 1, f"train.max_steps={self.max_steps} must be >= 1"),
            (self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1"),
            (self.temperature > 0, f"train.temperature={self.temperature} must be > 0"),
            (self.r >= 1, f"train.r={self.r} (LoRA rank) must be >= 1"),
            (self.alpha > 0, f"train.alpha={self.alpha} must be > 0"),
            (0 <= self.dropout < 1, f"train.dropout={self.dropout} must be in [0, 1)"),
            (0 <= self.model_dropout < 1, f"train.model_dropout={self.model_dropout} must be in [0, 1)"),
            (self.max_length >= 1, f"train.max_length={self.max_length} must be >= 1"),
            (self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0"),
            (self.max_grad_norm > 0, f"train.max_grad_norm={self.max_grad_norm} must be > 0"),
            (self.save_every >= 1, f"train.save_every={self.save_every} must be >= 1"),
            (self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"train.precision={self.precision!r}: use auto, fp32, bf16 or fp16"),
            (self.scheduler in ("linear", "cosine", "constant", "constant_with_warmup"),
             f"train.scheduler={self.scheduler!r}: use linear, cosine, constant or constant_with_warmup"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmbedkitError(message)
        self.target_modules = tuple(self.target_modules)

    def fingerprint(self, *parts) -> str:
        keep = {k: v for k, v in vars(self).items() if k not in ("resume", "save_every", "keep_checkpoints", "export")}
        return hashlib.sha256(json.dumps([keep, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- distributed helpers -------------------------------------------------------------------------------

def init_distributed() -> None:
    """Join the process group that ``torchrun`` set up (nothing to do for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping gradients for this rank's slice."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


# --- the trainer ----------------------------------------------------------------------------------------

def width_groups(lengths: list[int], ratio: float = 0.5) -> list[list[int]]:
    """Indices grouped longest first; a new group starts where a sequence is at most ``ratio`` times the
    group's longest (it would be more than half padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if not groups or lengths[i] <= ratio * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


class Trainer:
    def __init__(self, backbone: Backbone, prompt: Prompt, pooling: Pooling, pairs: PairSet, cfg: TrainConfig,
                 optimizer_factory, logger=None, checkpoint_dir: Path | None = None, seed: int = 0,
                 show_progress: bool = True) -> None:
        self._prepare_pairs(backbone, prompt, pairs, cfg, seed)  # pairs that teach nothing stop here
        self.pooling, self.logger, self.show_progress = pooling, logger, show_progress
        self.device = backbone.device
        self.base_name = backbone.name
        self.model = self._make_peft_model(backbone)
        self.position_ids = takes_position_ids(self.model)
        self.dtype = self._autocast_dtype()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(params)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.checkpoint_dir = checkpoint_dir
        self.step = 0
        self.history: list[dict] = []
        self.false_negatives = 0

    @classmethod
    def check_input(cls, backbone: Backbone, prompt: Prompt, pairs: PairSet, cfg: TrainConfig, seed: int = 0) -> None:
        """Every check of the training input that needs only the tokenizer (no model copy, no forward);
        ``embedkit.run`` calls it before the evaluation that precedes training."""
        cls.__new__(cls)._prepare_pairs(backbone, prompt, pairs, cfg, seed)

    def _prepare_pairs(self, backbone: Backbone, prompt: Prompt, pairs: PairSet, cfg: TrainConfig, seed: int) -> None:
        """Tokenize the pairs, plan the batches and check them: no model work."""
        self.cfg, self.prompt, self.pairs, self.seed = cfg, prompt, pairs, seed
        self.rank, self.world = rank_and_world()
        if cfg.batch_size % self.world:
            raise EmbedkitError(f"train.batch_size={cfg.batch_size} must be divisible by the {self.world} ranks")
        if cfg.batch_size > len(pairs):
            raise EmbedkitError(f"train.batch_size={cfg.batch_size} is larger than the {len(pairs)} pairs of "
                                f"{pairs.name}; lower train.batch_size or give more pairs")
        self.tokenizer = backbone.tokenizer
        self.steps_per_epoch = len(pairs) // cfg.batch_size
        self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        # tokenize once; the text is cut to max_length tokens before the prompt wraps it
        tok = lambda texts: tokenize(self.tokenizer, prompt, texts, cfg.max_length)  # noqa: E731
        self.anchor_ids = [t.ids for t in tok(pairs.anchors)]
        self.positive_ids = [t.ids for t in tok(pairs.positives)]
        self.negative_ids = [t.ids for t in tok(pairs.negatives)] if pairs.negatives else None
        keys: dict[tuple[int, ...], int] = {}  # one integer per distinct token sequence (false negatives)
        self._anchor_key = torch.tensor([keys.setdefault(t, len(keys)) for t in self.anchor_ids])
        self._positive_key = torch.tensor([keys.setdefault(t, len(keys)) for t in self.positive_ids])
        self._check_pairs()

    def _check_pairs(self) -> None:
        """Refuse pairs that would train on nothing: a batch whose every in-batch negative is masked as a
        false negative, or SimCSE pairs (anchor == positive) whose two views cannot differ. Only the
        token ids and the batch order are needed, so this runs before any model work."""
        cfg, name = self.cfg, self.pairs.source or self.pairs.name
        if self.negative_ids is not None:  # hard negatives are negatives whatever the batch holds
            return
        if cfg.negatives == "chunk" and cfg.chunk_size * self.world < 2:
            raise EmbedkitError(f"train.negatives=chunk with train.chunk_size={cfg.chunk_size} on {self.world} "
                                "rank(s): every loss sees a single pair and no negatives; raise train.chunk_size "
                                "or use train.negatives=full")
        for epoch in range(math.ceil(self.total_steps / self.steps_per_epoch)):
            for pos, batch in enumerate(self.batches(epoch)):
                step = epoch * self.steps_per_epoch + pos
                if step >= self.total_steps:
                    break
                groups = [batch] if cfg.negatives == "full" else self._chunk_groups(batch)
                if all(self._no_negatives(g) for g in groups):
                    raise EmbedkitError(
                        f"{name}: the batch of step {step + 1} ({len(batch)} pairs) has no negatives left: every "
                        "other pair in it has the same anchor or the same positive (after cutting to "
                        f"train.max_length={cfg.max_length} tokens), so all in-batch negatives are masked as false "
                        "negatives and the loss would be 0 (training on nothing). Deduplicate the pairs, add more "
                        "distinct pairs, or set train.mask_false_negatives=false")
        same = sum(a == p for a, p in zip(self.anchor_ids, self.positive_ids))
        if same and cfg.model_dropout == 0:
            if same == len(self.anchor_ids):
                raise EmbedkitError(
                    f"{name}: every anchor equals its positive (SimCSE-style pairs) but train.model_dropout=0, so "
                    "both views of a pair are the same embedding and there is no training signal (LoRA dropout "
                    "does not help: lora_B starts at 0). Set train.model_dropout>0 (e.g. train.model_dropout=0.1) "
                    "or make positives with an augmentation (e.g. augmentation=noise)")
            log.warning("%s: %d of %d pairs have anchor == positive; with train.model_dropout=0 their two views "
                        "are identical (set train.model_dropout>0 for SimCSE pairs)", name, same, len(self.anchor_ids))

    def _chunk_groups(self, batch: list[int]) -> list[list[int]]:
        """For ``negatives: chunk``: the pairs each chunk's loss sees, i.e. chunk k of every rank in rank
        order (what ``_gather`` concatenates)."""
        per_rank, size = len(batch) // self.world, self.cfg.chunk_size
        slices = [batch[r * per_rank:(r + 1) * per_rank] for r in range(self.world)]
        return [[i for sl in slices for i in sl[k:k + size]] for k in range(0, per_rank, size)]

    def _no_negatives(self, idx: list[int]) -> bool:
        if len(idx) < 2:
            return True
        if not self.cfg.mask_false_negatives:
            return False
        return int(self._same_text(idx).sum()) == len(idx) * (len(idx) - 1)

    def _make_peft_model(self, backbone: Backbone):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.named_modules()}
        missing = [m for m in self.cfg.target_modules if m not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise EmbedkitError(f"train.target_modules: {missing} not found in {backbone.name}; "
                                f"its linear layers are named {linear}")
        if self.cfg.model_dropout and not any(hasattr(m, "attention_dropout") for m in backbone.model.modules()):
            raise EmbedkitError(f"train.model_dropout={self.cfg.model_dropout} has no effect on {backbone.name}: its "
                                "attention modules have no attention_dropout; set train.model_dropout=0 (and make "
                                "positives with an augmentation if anchors equal positives)")
        model = copy.deepcopy(backbone.model)  # the loaded backbone stays untouched for other jobs
        if self.cfg.model_dropout:
            for module in model.modules():
                if hasattr(module, "attention_dropout"):
                    module.attention_dropout = self.cfg.model_dropout
        lora = LoraConfig(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                          target_modules=list(self.cfg.target_modules), bias="none")
        if getattr(model, "is_quantized", False):  # QLoRA: norms in fp32, inputs require grad
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
        model = get_peft_model(model, lora)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model

    def _autocast_dtype(self) -> torch.dtype | None:
        from embedkit.embed.models import cpu_supports_bf16

        p = self.cfg.precision
        if p == "auto":
            if self.device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.bfloat16 if cpu_supports_bf16() else None
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    # -- embedding ------------------------------------------------------------------------------------

    def _embed(self, seqs: list[tuple[int, ...]]) -> torch.Tensor:
        """Pooled embeddings of ``seqs`` in their order. On CPU, sequences of very different lengths (short
        titles and long bodies) run as separate passes, so short ones are not padded to the longest; the split
        depends on lengths only, so a GradCache replay draws the same dropout masks."""
        ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
               else contextlib.nullcontext())
        reps, order = [], []
        # on a GPU, passes of a few thousand tokens are bound by kernel launches, not arithmetic: one pass
        groups = width_groups([len(s) for s in seqs]) if self.device.type == "cpu" else [list(range(len(seqs)))]
        for group in groups:
            ids, mask = collate([seqs[i] for i in group], self.tokenizer.pad_token_id, self.device)
            with ctx:
                hidden = last_hidden(self.model, ids, mask, self.position_ids)
            reps.append(self.pooling.select(pool_all(hidden, mask)).float())
            order += group
        out = torch.cat(reps)
        if order != sorted(order):
            out = out[torch.argsort(torch.tensor(order, device=out.device))]
        return out

    def _chunk_seqs(self, idx: list[int]) -> tuple[list, int]:
        seqs = [self.anchor_ids[i] for i in idx] + [self.positive_ids[i] for i in idx]
        if self.negative_ids is not None:
            seqs += [self.negative_ids[i] for i in idx]
        return seqs, len(idx)

    def _split(self, reps: torch.Tensor, n: int):
        return reps[:n], reps[n:2 * n], (reps[2 * n:] if self.negative_ids is not None else None)

    def _same_text(self, idx: list[int]) -> torch.Tensor:
        """[n, n]: off-diagonal pairs of ``idx`` with the same anchor or the same positive tokens."""
        a, p = self._anchor_key[idx], self._positive_key[idx]
        ex = (a[:, None] == a[None, :]) | (p[:, None] == p[None, :])
        return ex.fill_diagonal_(False)

    def _exclude(self, idx: list[int]) -> torch.Tensor | None:
        """Off-diagonal pairs with the same anchor or positive text: false negatives, masked out."""
        if not self.cfg.mask_false_negatives:
            return None
        ex = self._same_text(idx)
        self.false_negatives += int(ex.sum()) // 2
        return ex.to(self.device)

    def _loss(self, a, p, n, exclude):
        c = self.cfg
        return info_nce(a, p, c.temperature, negatives=n, symmetric=c.symmetric, margin=c.margin, exclude=exclude)

    # -- one optimizer step -----------------------------------------------------------------------------

    def _rng_state(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def _replay(self, state):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)
            yield

    def _backward(self, x: torch.Tensor) -> None:
        (self.scaler.scale(x) if self.scaler is not None else x).backward()

    def train_step(self, batch: list[int]) -> float:
        """One optimizer step on the pairs ``batch`` (global indices; each rank takes its slice)."""
        return self._finish_step(self.accumulate_gradients(batch))

    def accumulate_gradients(self, batch: list[int]) -> float:
        """Forward and backward for one batch; the gradients (averaged over ranks) are left in ``.grad``.
        Returns the loss."""
        loss = self._local_backward(batch)
        if self.world > 1:
            for prm in self.model.parameters():
                if prm.requires_grad and prm.grad is not None:
                    dist.all_reduce(prm.grad)
                    prm.grad /= self.world
        return loss

    def _local_backward(self, batch: list[int]) -> float:
        cfg = self.cfg
        per_rank = len(batch) // self.world
        local = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        if cfg.negatives == "full" and len(local) > cfg.chunk_size:
            # GradCache's loss sees the whole batch whatever the chunks hold: chunk pairs of similar
            # length together (less padding); every rank sorts every slice the same way
            size = lambda i: -(len(self.anchor_ids[i]) + len(self.positive_ids[i]))  # noqa: E731
            slices = [sorted(batch[r * per_rank:(r + 1) * per_rank], key=size) for r in range(self.world)]
            batch, local = [i for sl in slices for i in sl], slices[self.rank]
        chunks = [local[i:i + cfg.chunk_size] for i in range(0, len(local), cfg.chunk_size)]
        self.model.train()
        if cfg.negatives == "chunk":  # plain accumulation: each chunk is its own small batch
            total = 0.0
            for ch, gathered in zip(chunks, self._chunk_groups(batch)):
                seqs, m = self._chunk_seqs(ch)
                a, p, n = self._split(self._embed(seqs), m)
                loss = self._loss(_gather(a), _gather(p), None if n is None else _gather(n), self._exclude(gathered))
                self._backward(loss * len(ch) / len(local))
                total += float(loss.detach()) * len(ch) / len(local)
            return total
        exclude = self._exclude(batch)
        if len(chunks) == 1:  # the whole batch fits one pass: no caching needed
            a, p, n = self._split(self._embed(self._chunk_seqs(local)[0]), len(local))
            loss = self._loss(_gather(a), _gather(p), None if n is None else _gather(n), exclude)
            self._backward(loss)
            return float(loss.detach())
        # GradCache: 1) embed every chunk without a graph, remembering the random state
        states, reps = [], []
        with torch.no_grad():
            for ch in chunks:
                states.append(self._rng_state())
                reps.append(self._embed(self._chunk_seqs(ch)[0]))
        parts = [self._split(r, len(ch)) for r, ch in zip(reps, chunks)]
        a = torch.cat([x[0] for x in parts]).requires_grad_()
        p = torch.cat([x[1] for x in parts]).requires_grad_()
        n = torch.cat([x[2] for x in parts]).requires_grad_() if self.negative_ids is not None else None
        # 2) the loss over the full batch, back to the embeddings only
        loss = self._loss(_gather(a), _gather(p), None if n is None else _gather(n), exclude)
        loss.backward()
        # 3) re-encode each chunk with its random state and push the cached gradients through
        start = 0
        for ch, state in zip(chunks, states):
            sl = slice(start, start + len(ch))
            with self._replay(state):
                ra, rp, rn = self._split(self._embed(self._chunk_seqs(ch)[0]), len(ch))
            surrogate = (ra * a.grad[sl]).sum() + (rp * p.grad[sl]).sum()
            if rn is not None:
                surrogate = surrogate + (rn * n.grad[sl]).sum()
            self._backward(surrogate)
            start += len(ch)
        return float(loss.detach())

    def _finish_step(self, loss: float) -> float:
        if not math.isfinite(loss):
            raise EmbedkitError(f"the loss became {loss} at step {self.step + 1}; no checkpoint was written for "
                                "it. Lower optimizer.lr, use train.precision=fp32, or check the pairs")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._last_grad_norm = grad_norm
        return loss

    # -- the loop ---------------------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.pairs), generator=g).tolist()
        b = self.cfg.batch_size
        return [order[i:i + b] for i in range(0, self.steps_per_epoch * b, b)]

    def fit(self) -> dict:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        elif self.checkpoint_dir is not None and self._checkpoints():
            log.warning("checkpoints exist in %s; starting over (set train.resume=true to continue)",
                        self.checkpoint_dir)
        if self.step == 0:
            torch.manual_seed(self.seed)  # dropout masks; a resumed run restores the saved random state
        start_step, t0, pairs_seen = self.step, time.perf_counter(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.show_progress or self.rank != 0, dynamic_ncols=True)
        loss = float("nan")
        while self.step < self.total_steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            batch = self.batches(epoch)[pos]
            t = time.perf_counter()
            loss = self.train_step(batch)
            dt = time.perf_counter() - t
            pairs_seen += len(batch)
            row = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                   "train/grad_norm": self._last_grad_norm, "train/pairs_per_s": len(batch) / dt,
                   "train/memory_gib": self._memory_gib(), "train/epoch": epoch}
            self.history.append({"step": self.step, **row})
            if self.logger is not None and self.rank == 0:
                self.logger.log(row, step=self.step)
            bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{len(batch) / dt:.1f}")
            bar.update(1)
            if self.checkpoint_dir is not None and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                self.save_checkpoint()
        bar.close()
        wall = time.perf_counter() - t0
        if self.false_negatives:
            log.warning("masked %d false-negative pairs (identical anchors or positives in one batch)",
                        self.false_negatives)
        return {"steps": self.step, "steps_this_run": self.step - start_step, "resumed_from": start_step or None,
                "pairs_seen": self.step * cfg.batch_size, "final_loss": loss,
                "first_loss": self.history[0]["train/loss"] if self.history else None,
                "wall_s": round(wall, 2), "pairs_per_s": round(pairs_seen / wall, 2) if wall else None,
                "peak_memory_gib": self._memory_gib(peak=True), "negatives": cfg.negatives,
                "negatives_per_loss": (cfg.batch_size if cfg.negatives == "full" else cfg.chunk_size),
                "false_negatives_masked": self.false_negatives, "world_size": self.world,
                "autocast": str(self.dtype).removeprefix("torch.") if self.dtype else "fp32",
                "pairs": self.pairs.describe()}

    def _memory_gib(self, peak: bool = False) -> float:
        if self.device.type == "cuda":
            b = torch.cuda.max_memory_allocated(self.device) if peak else torch.cuda.memory_allocated(self.device)
            return round(b / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # peak RSS (KiB -> GiB)

    # -- checkpoints --------------------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "state.pt").exists())

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        target = self.checkpoint_dir / f"step-{self.step:07d}"
        with atomic_dir(target) as tmp:  # a checkpoint folder is complete or absent
            self.model.save_pretrained(tmp / "adapter")
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "rng": self._rng_state(),
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "history": self.history, "false_negatives": self.false_negatives}, tmp / "state.pt")
        for old in self._checkpoints()[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _resume(self) -> None:
        found = self._checkpoints()
        if not found:
            log.info("train.resume=true but no checkpoint in %s; starting from step 0", self.checkpoint_dir)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        last = found[-1]
        weights = load_file(str(last / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, weights)
        state = torch.load(last / "state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        self.false_negatives = state["false_negatives"]
        torch.set_rng_state(state["rng"][0].cpu())
        if state["rng"][1] is not None:
            torch.cuda.set_rng_state(state["rng"][1].cpu(), self.device)
        log.info("resumed from %s (step %d of %d)", last, self.step, self.total_steps)

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
