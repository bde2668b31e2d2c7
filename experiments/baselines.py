"""The paper's reference code, re-implemented faithfully as baselines for ``bench.py`` and the tests.

Read from the reference code (../shared/docs/paper.md): evaluation runs ``AutoModelForCausalLM`` with
``output_hidden_states=True`` (so the LM head runs and every layer's states are kept), in batches of 16 in
corpus order, fp16 on GPU; training wraps the CausalLM in LoRA r 64 and steps on 120 pairs as 12-pair
micro-batches with 10 accumulation steps, fp16 autocast; paraphrases come one text per ``generate`` call.

Both sides of every comparison get the same token ids (``embedkit.embed.tokenize``), so a difference in
speed is a difference in how the work is done, not in what is computed; the poolings here are written
per row on the unpadded states, the plain definition that embedkit's batched ``pool_all`` must match.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from embedkit.train.losses import info_nce
from embedkit.embed.pooling import BASE_MODES


def pool_row(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every pooling of one unpadded sequence [L, D] whose last token is the appended EOS."""
    h = h.float()
    body = h[:-1]
    w = torch.arange(1, body.shape[0] + 1, device=h.device, dtype=h.dtype)
    return {"mean": body.mean(0), "last": h[-2], "eos": h[-1],
            "weighted_mean": (body * w[:, None]).sum(0) / w.sum()}


def pad(seqs: list[tuple[int, ...]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl], mask[r, sl] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def paper_encode(lm, seqs: list[tuple[int, ...]], pad_id: int, batch_size: int = 16,
                 padding_side: str = "left") -> dict[str, np.ndarray]:
    """The reference evaluation loop: CausalLM with all hidden states, fixed batches in corpus order,
    the final layer's states pooled row by row. Returns float32 [N, D] per base pooling mode."""
    device = next(lm.parameters()).device
    out = {m: [] for m in BASE_MODES}
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad(seqs[start:start + batch_size], pad_id, padding_side, device)
        hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        for r in range(ids.shape[0]):
            for mode, v in pool_row(hidden[r][mask[r].bool()]).items():
                out[mode].append(v.cpu().numpy())
    return {m: np.stack(v) for m, v in out.items()}


class PaperTrainer:
    """The reference training step: LoRA on the CausalLM, ``micro`` pairs per forward, ``accumulation``
    micro-batches per optimizer step (each loss sees ``micro``-way negatives), anchors and positives as
    two forwards, the last token of the final hidden state, fp16 autocast with a GradScaler on GPU."""

    def __init__(self, lm, pad_id: int, anchors: list, positives: list, r: int = 64, alpha: int = 16,
                 dropout: float = 0.05, lr: float = 5e-5, temperature: float = 0.2, micro: int = 12,
                 accumulation: int = 10,
                 targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> None:
        from peft import LoraConfig, get_peft_model

        self.model = get_peft_model(lm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=list(targets), bias="none"))
        self.device = next(lm.parameters()).device
        self.pad_id, self.anchors, self.positives = pad_id, anchors, positives
        self.temperature, self.micro, self.accumulation = temperature, micro, accumulation
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        cuda = self.device.type == "cuda"
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else contextlib.nullcontext)
        self.scaler = torch.amp.GradScaler("cuda") if cuda else None

    def _last_token(self, seqs) -> torch.Tensor:
        ids, mask = pad(seqs, self.pad_id, "left", self.device)
        with self.autocast():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1][:, -1].float()

    def step(self, start: int) -> float:
        """One optimizer step on pairs ``start .. start + micro * accumulation``; returns the mean loss."""
        self.model.train()
        total = 0.0
        for k in range(self.accumulation):
            sl = slice(start + k * self.micro, start + (k + 1) * self.micro)
            a, p = self._last_token(self.anchors[sl]), self._last_token(self.positives[sl])
            loss = info_nce(a, p, self.temperature) / self.accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


class PlainLoop:
    """A plain hand-written LoRA step, as a user would write it beside embedkit: peft LoRA on the base model,
    anchors and positives as one left-padded forward each (the final hidden state's last token), InfoNCE
    over the step's in-batch negatives, one backward, AdamW. No GradCache, no length grouping."""

    def __init__(self, model, pad_id: int, anchors: list, positives: list, r: int, alpha: int, dropout: float,
                 lr: float, temperature: float,
                 targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> None:
        from peft import LoraConfig, get_peft_model

        self.model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=list(targets), bias="none"))
        self.device = next(model.parameters()).device
        self.pad_id, self.anchors, self.positives, self.temperature = pad_id, anchors, positives, temperature
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)

    def _last_token(self, seqs) -> torch.Tensor:
        ids, mask = pad(seqs, self.pad_id, "left", self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float()

    def step(self, idx: list[int]) -> float:
        """One optimizer step on the pairs ``idx``; returns the loss."""
        self.model.train()
        a = self._last_token([self.anchors[i] for i in idx])
        p = self._last_token([self.positives[i] for i in idx])
        loss = info_nce(a, p, self.temperature)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
