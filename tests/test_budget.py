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


class FakeClock:
    """``time.perf_counter`` for the trainer module: time passes only when a training step runs (1 s each)."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def test_fit_budget_plans_the_schedule_for_the_steps_the_budget_holds_and_a_resume_keeps_it(backbone, tmp_path,
                                                                                          monkeypatch):
    """Steps of exactly 1 s (a fake clock) and a 30 s budget: after the 5 probe steps 25 s are left, which hold
    int(25 * 0.98) = 24 more steps, so the schedule is re-planned for 29 of the 40 planned steps, ends at
    lr 0 on step 29 and the run stops by its steps, inside the budget. The schedule is never lengthened."""
    import embedkit.train.trainer as trainer_module

    with pytest.raises(EmbedkitError, match="train.fit_budget=true fits the schedule to train.max_minutes"):
        TrainConfig(fit_budget=True)
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    pairs = load_pairs(str(CLINC), max_rows=32, seed=3)
    t = make(backbone, pairs, tmp_path / "fit", max_steps=40, max_length=8, batch_size=4, chunk_size=4,
             fit_budget=True, max_minutes=0.5, save_every=100)
    step = t.train_step

    def one_second_step(batch):
        loss = step(batch)
        clock.now += 1.0
        return loss

    monkeypatch.setattr(t, "train_step", one_second_step)
    out = t.fit()
    assert out["budget_fit"] == {"probe_steps": 5, "s_per_step": 1.0, "steps_planned_before": 40, "steps": 29}
    assert (out["steps"], out["steps_planned"], out["stopped_by"]) == (29, 29, "steps")
    lrs = [h["train/lr"] for h in t.history]  # warm-up 2 steps, then linear to 0 at step 29
    assert lrs[1] == pytest.approx(1e-3) and lrs[14] == pytest.approx(1e-3 * 14 / 27) and lrs[-1] == 0.0
    assert [p.name for p in (tmp_path / "fit").glob("step-*")] == ["step-0000029"]

    resumed = make(backbone, pairs, tmp_path / "fit", max_steps=40, max_length=8, batch_size=4, chunk_size=4,
                   fit_budget=True, max_minutes=0.5, resume=True)
    again = resumed.fit()  # the fitted plan comes back with the checkpoint: nothing left to train
    assert (again["steps"], again["steps_planned"], again["steps_this_run"]) == (29, 29, 0)
    assert again["budget_fit"]["steps"] == 29

    fast = make(backbone, pairs, tmp_path / "fast", max_steps=6, max_length=8, batch_size=4, chunk_size=4,
                fit_budget=True, max_minutes=0.5)
    monkeypatch.setattr(fast, "train_step", one_second_step)
    assert fast.fit()["budget_fit"]["steps"] == 6  # 25 s would hold more: the plan is kept, not lengthened
