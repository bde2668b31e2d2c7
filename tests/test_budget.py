"""The wall-time budget of a training run (``train.max_minutes``, issue 16): the trainer stops after the
step during which the budget ran out, checkpoints there, records ``stopped_by``, and a resumed run
continues the same LR schedule to the same weights; checkpoint keys do not change."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import SHARED_DATA, run_cli
from embedkit.data.pairs import load_pairs
from embedkit.embed.pooling import Pooling
from embedkit.embed.prompts import Prompt
from embedkit.errors import EmbedkitError
from embedkit.run import checkpoint_key
from embedkit.train import TrainConfig, Trainer

PROMPT = Prompt("eol", 'This sentence: "{text}" means in one word:')
CLINC = SHARED_DATA / "pairs" / "clinc150_same_intent" / "train.jsonl"
NEWS = SHARED_DATA / "pairs" / "twentynewsgroups_subject_body" / "train.jsonl"
TINY = dict(r=4, alpha=8, dropout=0.0, model_dropout=0.0, max_length=16, warmup_steps=2, scheduler="linear",
            precision="fp32", batch_size=8, chunk_size=8, max_steps=3, epochs=10, save_every=10)


def config(*overrides):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_max_minutes_is_checked_and_not_part_of_the_checkpoint_key(monkeypatch):
    monkeypatch.setenv("EMBEDKIT_MODEL_CACHE", "/models")  # as tests/test_keys.py pins the key
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", "/outputs")
    assert TrainConfig().max_minutes is None
    with pytest.raises(EmbedkitError, match=r"train.max_minutes=0 must be > 0 \(null: no time budget\)"):
        TrainConfig(max_minutes=0)
    from embedkit.schema import validate

    with pytest.raises(EmbedkitError, match="train.max_minutes='abc': expected a number"):
        validate(config("train=lora", "train.max_minutes=abc"))
    validate(config("train=lora", "train.max_minutes=0.05"))
    keys = set()
    for budget in ([], ["train.max_minutes=30"], ["train.max_minutes=0.05"]):
        cfg = config("train=lora", *budget)
        keys.add(checkpoint_key(cfg, TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))))
    assert keys == {"f47beada8607"}  # the key of earlier versions (tests/test_keys.py): old checkpoints resume


def make(backbone, pairs, folder, **kw):
    torch.manual_seed(0)
    return Trainer(backbone, PROMPT, Pooling("last", "last"), pairs, TrainConfig(**{**TINY, **kw}),
                   partial(torch.optim.AdamW, lr=1e-3), checkpoint_dir=folder, seed=0, show_progress=False)


def test_a_budget_stop_checkpoints_and_resumes_to_the_uninterrupted_result(backbone, tmp_path):
    pairs = load_pairs(str(CLINC), max_rows=32, seed=3)
    full = make(backbone, pairs, tmp_path / "full")
    whole = full.fit()
    assert (whole["stopped_by"], whole["steps"], whole["steps_planned"], whole["max_minutes"]) == ("steps", 3, 3, None)

    cut = make(backbone, pairs, tmp_path / "cut", max_minutes=1e-9)  # runs out during the first step
    part = cut.fit()
    assert (part["stopped_by"], part["steps"], part["steps_planned"], part["steps_this_run"]) == ("budget", 1, 3, 1)
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-0000001"]  # saved as at a normal end
    adapter = cut.save_adapter(tmp_path / "adapter")
    assert json.loads((adapter / "embedkit.json").read_text())["steps"] == 1
    # the schedule is planned for all 3 steps: the stop leaves the LR where the plan had it after step 1
    assert cut.scheduler.get_last_lr()[0] == pytest.approx(full.history[0]["train/lr"]) == 5e-4  # mid-warmup

    resumed = make(backbone, pairs, tmp_path / "cut", resume=True, max_minutes=60)  # another budget: same key
    rest = resumed.fit()
    assert (rest["stopped_by"], rest["steps"], rest["resumed_from"], rest["steps_this_run"]) == ("steps", 3, 1, 2)
    for key in ("train/loss", "train/lr"):
        assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in full.history], rel=1e-5), key
    for (name, p1), (_, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if p1.requires_grad:
            torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=name)


def test_a_command_line_run_stops_on_its_budget_saves_the_adapter_and_evaluates(tmp_path, clustering_root):
    """3 s of training (train.max_minutes=0.05) out of 1000 planned steps, on crops of newsgroup bodies
    read as unlabelled texts, then the evaluation of the tuned model."""
    r = run_cli("data=jsonl", f"data.root={clustering_root}", "data.include=[twentynewsgroups/test.jsonl]",
                "data.max_rows=100", "logger=none", "encode.max_length=16", "encode.show_progress=false",
                "model.dtype=float32", "train=lora", "pairs=texts", f"pairs.path={NEWS}", "pairs.text_field=positive",
                "pairs.max_rows=64", "augmentation=crop", "train.batch_size=8", "train.chunk_size=8",
                "train.max_length=16", "train.r=4", "train.alpha=8", "train.max_steps=1000", "train.epochs=200",
                "train.warmup_steps=0", "train.max_minutes=0.05", "train.save_every=500", "optimizer.lr=1e-3",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.max_minutes=0.05 ran out" in r.stdout + r.stderr
    (path,) = (tmp_path / "outputs" / "runs").glob("*/results.json")
    res = json.loads(path.read_text())
    t = res["train"]
    assert (t["stopped_by"], t["steps_planned"], t["max_minutes"]) == ("budget", 1000, 0.05)
    assert 1 <= t["steps"] < 1000 and t["wall_s"] >= 3.0
    assert t["pairs"]["name"] == "twentynewsgroups_subject_body+crop" and t["pairs"]["anchor_is_positive"] == 0
    assert json.loads((tmp_path / "outputs" / "runs" / path.parent.name / "adapter" / "embedkit.json").read_text())[
        "steps"] == t["steps"]
    assert list((tmp_path / "outputs" / "checkpoints").glob(f"*/step-{t['steps']:07d}/adapter"))
    assert set(res["scores"]) == set(res["scores_before"]) == {"twentynewsgroups/test"}
    assert res["adapter"] == res["adapter_dir"]  # the "after" scores are the tuned model's
