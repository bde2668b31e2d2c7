"""mteb result files: every run's registry-task scores as mteb ``TaskResult`` files that mteb's own
``ResultCache`` loads back, and ``embedkit-report --mteb-results`` beside published models.

One tiny real CLI run (40 rows of local data, texts cut at 16 tokens) gives a real results.json. MTEB's
datasets cannot be downloaded here, so the registry-task runs are that results.json with the task entries a
registry run records (``MtebTask.describe``) and scores we set: the files' round trip, not the scores, is
what is tested."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import pytest

from conftest import run_cli
from embedkit.data.mteb import MtebTask, import_mteb
from embedkit.evaluate.mteb_results import model_meta, write_mteb_results
from embedkit.io import write_json

mteb = import_mteb()
from mteb.cache import ResultCache  # noqa: E402
from mteb.models import ModelMeta  # noqa: E402

V1 = ["ArxivClusteringS2S", "RedditClustering", "TwentyNewsgroupsClustering"]  # 3 of MTEB(eng, v1)'s 11


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, clustering_root):
    """A real run on local data: its results.json, its outputs folder and its log."""
    cwd = tmp_path_factory.mktemp("run")
    r = run_cli("data=jsonl", f"data.root={clustering_root}", "data.include=[twentynewsgroups/test.jsonl]",
                "data.max_rows=40", "encode.max_length=16", "logger=none", "encode.show_progress=false", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (cwd / "outputs" / "runs").glob("*/results.json")
    return json.loads(path.read_text()), cwd / "outputs", r.stdout + r.stderr


def registry_run(base: dict, scores: dict[str, float], **fields) -> dict:
    """``base`` as a run on mteb registry tasks: the task entries such a run records, our ``scores``."""
    r = copy.deepcopy(base)
    r.update(scores=dict(scores), mean=sum(scores.values()) / len(scores),
             tasks={name: MtebTask(mteb.get_task(name)).describe() for name in scores}, **fields)
    return r


def test_the_folder_is_below_the_output_root_and_null_turns_it_off(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_module

    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path))
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        assert compose("config").paths.mteb_results == f"{tmp_path}/mteb_results"
        assert compose("config", overrides=["paths.mteb_results=null"]).paths.mteb_results is None
    assert write_mteb_results({"model": "m", "scores": {"TwentyNewsgroupsClustering": 0.5}}, None) == []


def test_a_run_on_local_sets_writes_results_json_and_no_task_result(real_run):
    results, outputs, log = real_run
    assert "no TaskResult for 1 task(s) (twentynewsgroups/test): not an MTEB registry task" in log
    assert "could not write mteb TaskResult" not in log
    assert not list(outputs.glob("mteb_results/**/*.json"))  # arxiv/s2s-like names are not MTEB tasks
    assert results["scores"]["twentynewsgroups/test"] > 0


def test_task_results_load_back_with_mtebs_own_result_cache(real_run, tmp_path):
    scores = {"ArxivClusteringS2S": 0.31234567, "TwentyNewsgroupsClustering": 0.4421}
    run = registry_run(real_run[0], scores)
    run["scores"]["twentynewsgroups/test"] = 0.5  # a local set beside them
    run["tasks"]["twentynewsgroups/test"] = real_run[0]["tasks"]["twentynewsgroups/test"]
    written = write_mteb_results(run, tmp_path)
    meta = model_meta(run)
    assert (meta.name, len(meta.revision)) == ("embedkit/smollm2-135m", 12)
    assert sorted(p.name for p in written) == ["ArxivClusteringS2S.json", "TwentyNewsgroupsClustering.json"]
    folder = tmp_path / "results" / "embedkit__smollm2-135m" / meta.revision / "experiments" / meta.experiment_name
    assert {p.parent for p in written} == {folder} and not list(tmp_path.rglob("*.tmp"))

    loaded = ResultCache(tmp_path).load_results(models=[meta])  # mteb's loader, by the run's ModelMeta
    (model,) = list(loaded)
    got = {t.task_name: t.get_score() for t in model.task_results}
    assert got == pytest.approx(scores, abs=1e-6)  # mteb's to_disk rounds to 6 decimals
    assert model.model_revision == meta.revision and model.experiment_name == meta.experiment_name
    by_name = ResultCache(tmp_path).load_results(models=["embedkit/smollm2-135m"], load_experiments="match_name")
    assert {t.task_name for m in by_name for t in m.task_results} == set(got)

    stored = ModelMeta.model_validate_json_resolved((folder / "model_meta.json").read_text())
    kwargs = stored.experiment_kwargs
    assert kwargs["prompt_template"] == 'This sentence: "{text}" means in one word:'
    assert (kwargs["pooling"], kwargs["pooling_spec"]["layer"], kwargs["max_length"]) == ("last", [29], 16)
    assert kwargs["pooling_spec"]["final_norm"] == "auto" and kwargs["dtype"] == run["encode"]["dtype"]
    task = mteb.get_task("ArxivClusteringS2S")
    result = mteb.TaskResult.from_disk(folder / "ArxivClusteringS2S.json")
    assert result.dataset_revision == task.metadata.revision and result.scores["test"][0]["v_measure"] == 0.312346


def test_two_configurations_of_one_model_never_mix(real_run, tmp_path):
    base = real_run[0]
    last = registry_run(base, {"TwentyNewsgroupsClustering": 0.40})
    mean = registry_run(base, {"TwentyNewsgroupsClustering": 0.30}, pooling="mean",
                        pooling_spec={**base["pooling_spec"], "mode": "mean"})
    layer = registry_run(base, {"TwentyNewsgroupsClustering": 0.20},
                         pooling_spec={**base["pooling_spec"], "layer": -8, "layers_resolved": [22]})
    rerun = registry_run(base, {"TwentyNewsgroupsClustering": 0.41}, run_dir="/elsewhere", created=base["created"])
    metas = [model_meta(r) for r in (last, mean, layer)]
    assert len({(m.revision, m.experiment_name) for m in metas}) == 3
    assert model_meta(rerun).revision == metas[0].revision  # the run folder is not part of the identity
    for r in (last, mean, layer, rerun):
        write_mteb_results(r, tmp_path)
    cache = ResultCache(tmp_path)
    for meta, want in zip(metas, (0.41, 0.30, 0.20)):  # the re-run replaced its own configuration's file only
        (model,) = list(cache.load_results(models=[meta]))
        assert [t.get_score() for t in model.task_results] == pytest.approx([want])


def test_a_fine_tuned_run_writes_before_and_after_under_two_identities(real_run, tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"lora weights")
    run = registry_run(real_run[0], {"TwentyNewsgroupsClustering": 0.5}, adapter=str(adapter),
                       scores_before={"TwentyNewsgroupsClustering": 0.4}, mean_before=0.4, train={"steps": 2})
    written = write_mteb_results(run, tmp_path / "mteb")
    tuned, base = model_meta(run), model_meta(run, tuned=False)
    assert tuned.experiment_kwargs["adapter"] == hashlib.sha256(b"lora weights").hexdigest()[:16]
    assert "adapter" not in base.experiment_kwargs and tuned.revision != base.revision and len(written) == 2
    cache = ResultCache(tmp_path / "mteb")
    for meta, want in ((tuned, 0.5), (base, 0.4)):
        (model,) = list(cache.load_results(models=[meta]))
        assert model.task_results[0].get_score() == pytest.approx(want)


def test_tasks_a_task_result_cannot_hold_exactly_are_skipped_with_the_reason(real_run, tmp_path, caplog):
    multi = next(t.metadata.name for t in mteb.get_tasks(task_types=["Clustering"]) if len(t.metadata.hf_subsets) > 1)
    run = registry_run(real_run[0], {multi: 0.5, "TwentyNewsgroupsClustering": 0.4})
    with caplog.at_level(logging.INFO, logger="embedkit.evaluate.mteb_results"):
        written = write_mteb_results(run, tmp_path)
    assert [p.name for p in written] == ["TwentyNewsgroupsClustering.json"]
    assert f"({multi}): scored over " in caplog.text and "results.json keeps only their mean" in caplog.text


def test_writing_is_atomic_and_a_failure_only_warns(real_run, tmp_path, monkeypatch, caplog):
    run = registry_run(real_run[0], {"TwentyNewsgroupsClustering": 0.4})
    (path,) = write_mteb_results(run, tmp_path)

    def broken(self, p):  # a crash half-way through mteb's own writer
        p.write_text('{"dataset_revision": ')
        raise OSError("disk on fire")

    monkeypatch.setattr(mteb.TaskResult, "to_disk", broken)
    with caplog.at_level(logging.WARNING):
        assert write_mteb_results(registry_run(real_run[0], {"TwentyNewsgroupsClustering": 0.9}), tmp_path) == []
    assert "could not write mteb TaskResult files" in caplog.text and "disk on fire" in caplog.text
    assert mteb.TaskResult.from_disk(path).get_score() == pytest.approx(0.4)  # the old file, whole
    assert not list(tmp_path.rglob("*.tmp"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert write_mteb_results(run, blocker / "mteb_results") == []  # cannot even make the folder: a warning


# --- embedkit-report --mteb-results -------------------------------------------------------------------

PUBLISHED = {  # model -> task -> main score; model-b lacks RedditClustering, model-c has 2 of the set + another
    "org-a/model-a": {name: 0.50 + i / 100 for i, name in enumerate(t.metadata.name for t in
                                                                     mteb.get_benchmark("MTEB(eng, v1)").tasks
                                                                     if t.metadata.type == "Clustering")},
    "org-b/model-b": {"ArxivClusteringS2S": 0.40, "TwentyNewsgroupsClustering": 0.46},
    "org-c/model-c": {"ArxivClusteringS2S": 0.30, "TwentyNewsgroupsClustering": 0.35, "RedditClustering": 0.60,
                      "Banking77Classification": 0.80},
}


@pytest.fixture
def results_repo(tmp_path):
    """A folder in the layout of github.com/embeddings-benchmark/results, written by mteb's own classes."""
    repo = tmp_path / "results-repo"
    cache = ResultCache(repo)
    for name, scores in PUBLISHED.items():
        meta = ModelMeta(loader=None, name=name, revision="rev1", release_date=None, languages=None, n_parameters=None,
                         memory_usage_mb=None, max_tokens=None, embed_dim=None, license=None, open_weights=True,
                         public_training_code=None, public_training_data=None, framework=["PyTorch"],
                         similarity_fn_name="cosine", use_instructions=False, training_datasets=None)
        for task_name, score in scores.items():
            task = mteb.get_task(task_name)
            main = task.metadata.main_score
            result = mteb.TaskResult.from_task_results(task, {"test": {"default": {"main_score": score, main: score}}},
                                                       evaluation_time=1.0)
            cache.save_to_cache(result, meta)
    assert (repo / "results" / "org-b__model-b" / "rev1" / "TwentyNewsgroupsClustering.json").exists()
    return repo


def test_report_puts_our_runs_beside_published_models_on_the_common_tasks(real_run, results_repo, tmp_path, capsys):
    from embedkit.commands.report import main

    runs = tmp_path / "runs"
    ours = {"ArxivClusteringS2S": 0.21, "RedditClustering": 0.33, "TwentyNewsgroupsClustering": 0.25}
    write_json(runs / "a" / "results.json", registry_run(real_run[0], ours))
    mean = registry_run(real_run[0], {"TwentyNewsgroupsClustering": 0.6}, pooling="mean",
                        pooling_spec={**real_run[0]["pooling_spec"], "mode": "mean"})
    write_json(runs / "b" / "results.json", mean)
    write_json(runs / "local" / "results.json", real_run[0])  # a run on local data: no MTEB task, no row
    main([str(runs), "--mteb-results", str(results_repo)])
    out = capsys.readouterr().out
    assert "MTEB(eng, v1), its 11 Clustering tasks" in out and "| mean (1 common) |" in out
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in out.splitlines()
            if line.startswith("| ") and "---" not in line}
    header = rows.pop("model")
    col = {name: i for i, name in enumerate(header)}
    meta = model_meta(registry_run(real_run[0], ours))
    (mine,) = [k for k in rows if "eol/last" in k]
    assert mine.startswith("**ours**: smollm2-135m") and f"{meta.name}@{meta.revision}" in mine
    assert [rows[mine][col[t]].strip() for t in ours] == ["21.0", "33.0", "25.0"]
    assert rows[mine][col["RedditClusteringP2P"]].strip() == ""  # a task we did not run: blank
    assert rows["org-b/model-b"][col["RedditClustering"]].strip() == ""  # a task they have no result for
    assert rows["org-a/model-a"][col["StackExchangeClustering"]].strip() == "58.0"
    assert "Banking77Classification" not in out  # not in the task set
    # the one task every row has is TwentyNewsgroupsClustering: the means are that task's scores
    assert [rows[k][-1].strip() for k in (mine, "org-a/model-a", "org-b/model-b", "org-c/model-c")] == [
        "25.0", "60.0", "46.0", "35.0"]
    assert "mean over the 1 task(s) every row has: TwentyNewsgroupsClustering (of 11)" in out
    assert (runs / "table-mteb.md").read_text() in out and (runs / "table-mteb.csv").exists()

    main([str(runs / "a"), "--mteb-results", str(results_repo / "results"), "--top", "1"])  # the results/ folder too
    out = capsys.readouterr().out
    assert "org-a/model-a" in out and "model-b" not in out and "model-c" not in out  # covers all 3 of ours
    assert "mean over the 3 task(s) every row has" in out and "| 21.0 |" in out


def test_report_without_any_mteb_task_run_says_what_to_do(real_run, results_repo, tmp_path, capsys):
    from embedkit.commands.report import main

    write_json(tmp_path / "runs" / "local" / "results.json", real_run[0])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "runs"), "--mteb-results", str(results_repo)])
    assert e.value.code == 2
    assert "no run under the given folders scored a Clustering task of MTEB(eng, v1) or MTEB(eng, v2)" in \
        capsys.readouterr().err
    write_json(tmp_path / "runs" / "mteb" / "results.json", registry_run(real_run[0], {"ArxivClusteringS2S": 0.2}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--mteb-results", str(tmp_path / "nowhere")])
    assert "nowhere: no such folder; give a local copy of the MTEB results repository" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--mteb-results", str(tmp_path), "--benchmark", "MTEB(eng, v9)"])
    assert "not an mteb benchmark" in capsys.readouterr().err
