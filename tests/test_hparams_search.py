"""Optuna searches (``embedkit -m hparams_search=...``, conf/hparams_search): the trials are real runs, the
sweeper's record agrees with their results.json, and a study in its SQLite file resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from embedkit.errors import EmbedkitError
from embedkit.schema import precheck

TASK = "arxiv/s2s"
TINY = ["data=jsonl", f"data.include=[{TASK}.jsonl]", "data.max_rows=60", "encode.max_length=32", "logger=none",
        "encode.show_progress=false"]


def trials_of(sweep: Path) -> list[dict]:
    """The results.json of a sweep folder, in job order."""
    return sorted((json.loads(p.read_text()) for p in sweep.glob("*/results.json")), key=lambda r: r["job"])


def test_optuna_search_records_the_best_trial_and_resumes_its_study(tmp_path, clustering_root):
    """Three trials of prompt x pooling (the search space narrowed on the command line to two prompts and the
    last block), twice: the second command continues the same study in outputs/optuna/prompt_pooling.db."""
    import optuna

    search = ["-m", "hparams_search=prompt_pooling", "hydra.sweeper.n_trials=3", "prompt=choice(none,eol)",
              "pooling.layer=-1", *TINY, f"data.root={clustering_root}"]
    first = tmp_path / "first"
    r = run_cli(*search, f"hydra.sweep.dir={first}", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = trials_of(first)
    assert [x["job"] for x in runs] == [0, 1, 2]
    for x in runs:  # each trial is a complete run of the configuration the sweeper drew
        assert x["prompt"] in ("none", "eol") and x["pooling"] in ("mean", "last", "eos", "weighted_mean", "concat")
        assert x["pooling_spec"]["layer"] == -1 and x["config"]["optimized_metric"] == "mean"
        assert x["mean"] == pytest.approx(x["scores"][TASK]) and x["tasks"][TASK]["n_texts"] == 60
    record = OmegaConf.to_container(OmegaConf.load(first / "optimization_results.yaml"))
    best = max(runs, key=lambda x: x["mean"])
    assert record["best_value"] == pytest.approx(best["mean"], abs=1e-12)
    assert record["best_params"] == {"prompt": best["prompt"], "pooling": best["pooling"]}

    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'prompt_pooling.db'}"
    study = optuna.load_study(study_name="prompt_pooling-smollm2-135m", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t, x in zip(study.trials, runs):  # trial i is job i: the value the task returned is its results.json mean
        assert t.value == pytest.approx(x["mean"], abs=1e-12)
        assert t.params == {"prompt": x["prompt"], "pooling": x["pooling"]} and t.user_attrs["pooling.layer"] == "-1"

    # the same command again: the study is loaded, not created, and gets 3 more trials. With the sampler's seed
    # unchanged and fewer trials than n_startup_trials, they are the same 3 draws, answered by the result cache
    second = tmp_path / "second"
    r2 = run_cli(*search, f"hydra.sweep.dir={second}", cwd=tmp_path, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Using an existing study with name 'prompt_pooling-smollm2-135m'" in r2.stdout + r2.stderr
    study = optuna.load_study(study_name="prompt_pooling-smollm2-135m", storage=storage)
    assert [t.number for t in study.trials] == list(range(6))
    again = trials_of(second)
    assert [t.value for t in study.trials[3:]] == pytest.approx([x["mean"] for x in again], abs=1e-12)
    assert [(x["prompt"], x["pooling"]) for x in again] == [(x["prompt"], x["pooling"]) for x in runs]
    for x, y in zip(again, runs):
        assert x["from_cache"]["scores"] == [TASK] and x["encode"]["forward_calls"] == 0
        assert x["mean"] == y["mean"]
    record2 = OmegaConf.to_container(OmegaConf.load(second / "optimization_results.yaml"))
    assert record2["best_value"] == pytest.approx(max(t.value for t in study.trials), abs=1e-12)


def test_a_search_can_optimize_one_task_and_a_wrong_task_stops_before_model_work(tmp_path, clustering_root):
    fixed = ["-m", "hparams_search=prompt_pooling", "hydra.sweeper.n_trials=1", "prompt=eol", "pooling=mean",
             "pooling.layer=-1", *TINY, f"data.root={clustering_root}"]
    r = run_cli(*fixed, "optimized_metric=scores.arxiv/s2ss", cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "optimized_metric='scores.arxiv/s2ss': expected mean, scores.<task>" in r.stderr
    assert "did you mean arxiv/s2s?" in r.stderr and "Traceback" not in r.stderr
    assert "loading model" not in r.stdout + r.stderr

    # two tasks, the objective is one of them: the sweeper gets that task's score, not the mean
    sweep = tmp_path / "one_task"
    r = run_cli(*fixed, f"data.include=[{TASK}.jsonl,clinc150/test.jsonl]", "optimized_metric=scores.clinc150/test",
                "hydra.sweeper.study_name=one_task", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = trials_of(sweep)
    record = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert record["best_value"] == pytest.approx(run["scores"]["clinc150/test"], abs=1e-12)
    assert abs(run["scores"]["clinc150/test"] - run["mean"]) > 1e-3


@pytest.mark.parametrize("args, fragments", [
    (["hparams_search=lora"], ["hparams_search is a search of many runs: start it with -m"]),
    (["-m", "hparams_search=lora", "train.temperature=interval(0, 0.2)"], ["train.temperature=0.0 must be > 0"]),
    (["-m", "hparams_search=lora", "train.r=choice(8, x)"], ["train.r='x': expected an integer"]),
    (["-m", "hparams_search=prompt_pooling", "prompt=choice(eol, eoll)"], ["prompt=eoll: no such option"]),
    (["-m", "hparams_search=prompt_pooling", "optimized_metric=mean_before"], ["mean_before needs train=lora"]),
    (["-m", "hparams_search=prompt_pooling", "optimized_metric=v_measure"], ["optimized_metric='v_measure'"]),
])
def test_search_command_lines_are_checked_before_any_run(tmp_path, monkeypatch, args, fragments):
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(EmbedkitError) as e:
        precheck(args)
    for f in fragments:
        assert f in str(e.value), str(e.value)


@pytest.mark.parametrize("search, checked", [
    ("prompt_pooling", 1 + 5 + 4 + 5),  # every choice of prompt, pooling and pooling.layer, one at a time
    ("lora", 1 + 1 + 3 + 1 + 3),        # both ends of optimizer.lr and train.temperature, every choice of r, steps
])
def test_search_configs_compose_and_every_value_of_their_space_validates(tmp_path, monkeypatch, search, checked):
    """Both searches compose with the Optuna sweeper, maximize the run's mean, keep their study in
    outputs/optuna/, and every value of their search space passes the config checks (no model work)."""
    import embedkit.schema as schema
    from hydra import compose, initialize_config_module

    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    seen = []

    def validate(cfg):
        schema_validate(cfg)
        seen.append(cfg)

    schema_validate = schema.validate
    monkeypatch.setattr(schema, "validate", validate)
    precheck(["-m", f"hparams_search={search}"])
    assert len(seen) == checked
    assert (tmp_path / "outputs" / "optuna").is_dir()  # made for SQLite, which makes no folders
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert (sweeper.direction, cfg.optimized_metric, sweeper.sampler._target_) == ("maximize", "mean",
                                                                                   "optuna.samplers.TPESampler")
    assert sweeper.storage == f"sqlite:///{tmp_path / 'outputs'}/optuna/{search}.db"
    if search == "lora":
        assert cfg.train.name == "lora" and set(sweeper.params) == {"optimizer.lr", "train.r", "train.temperature",
                                                                   "train.max_steps"}
        lrs = {c.optimizer.lr for c in seen}
        assert {1e-5, 1e-3} <= lrs
    else:
        assert cfg.train.name == "none" and set(sweeper.params) == {"prompt", "pooling", "pooling.layer"}
        assert {c.pooling.layer for c in seen} == {-1, -2, -4, -8, -12, -16}
