"""Paper tables, the per-task result cache, the report over real runs and W&B offline files.

Real runs of the embedded model on a tiny subset of ../shared/data (two tasks, 120 short texts, texts cut
to 32 tokens), made once per module: a 2 prompts x 2 poolings sweep; later tests re-run parts of it.
"""

import json
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conftest import ROOT, read_wandb_records, run_cli
from embedkit.errors import EmbedkitError
from embedkit.commands.report import main as report_main
from embedkit.report.results import load_references, scan
from embedkit.report.tables import pooling_table, reference_table

COMMON = ["data=jsonl", "encode.max_length=32", "encode.show_progress=false"]


def subset(source: Path, n_labels: int, per_label: int) -> list[dict]:
    by_label = defaultdict(list)
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_label[row["label"]].append({"text": row["text"], "label": row["label"]})
    return [r for lab in sorted(by_label)[:n_labels] for r in by_label[lab][:per_label]]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, clustering_root) -> Path:
    """Two real tasks: 6 CLINC150 intents x 10 queries, 5 arXiv categories x 12 titles."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    for rel, n, per in [("clinc150/test.jsonl", 6, 10), ("arxiv/s2s.jsonl", 5, 12)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in subset(clustering_root / rel, n, per)))
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_data):
    """(work folder, sweep folder, results by (prompt, pooling)) of a real 2 x 2 multirun logged to W&B offline."""
    work = tmp_path_factory.mktemp("work")
    folder = work / "outputs" / "multirun" / "grid"
    r = run_cli("-m", *COMMON, f"data.root={tiny_data}", "prompt=none,eol", "pooling=mean,last", "logger=wandb",
                f"hydra.sweep.dir={folder}", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {}
    for path in sorted(folder.glob("*/results.json")):
        res = json.loads(path.read_text())
        results[(res["prompt"], res["pooling"])] = res
    return work, folder, results


def test_multirun_two_prompts_by_two_poolings_gives_four_results_and_one_table(sweep, capsys):
    work, folder, results = sweep
    assert set(results) == {(p, q) for p in ("none", "eol") for q in ("mean", "last")}
    for (prompt, _), res in results.items():
        assert set(res["scores"]) == {"arxiv/s2s", "clinc150/test"} and res["from_cache"] == {"scores": []}
        assert all(0 < v <= 1 for v in res["scores"].values())
        assert res["tasks"]["clinc150/test"]["n_texts"] == 60 and res["tasks"]["arxiv/s2s"]["n_labels"] == 5
    # one encode per prompt: the second pooling job of a prompt reads the embedding cache
    for prompt in ("none", "eol"):
        calls = sorted(results[(prompt, q)]["encode"]["forward_calls"] for q in ("mean", "last"))
        assert calls[0] == 0 and calls[1] > 0
    report_main([str(folder), "--table", "prompts"])
    out = capsys.readouterr().out
    md = (folder / "table-prompts.md").read_text()
    assert md in out
    assert "| model | prompt | mean | last |" in md
    for prompt in ("none", "eol"):
        cells = [f"{100 * results[(prompt, q)]['mean']:.1f}" for q in ("mean", "last")]
        row = next(line for line in md.splitlines() if line.startswith(f"| smollm2-135m | {prompt} |"))
        assert [c.strip().strip("*") for c in row.strip("|").split("|")[2:]] == cells
    rows = (folder / "table-prompts.csv").read_text().splitlines()
    assert rows[0] == "model,prompt,mean,last" and len(rows) == 3
    assert (folder / "table-prompts.png").stat().st_size > 1000
    per_run = (folder / "report.csv").read_text().splitlines()
    assert len(per_run) == 5 and per_run[0].startswith("model,prompt,pooling,train,mean")


def test_wandb_offline_runs_hold_flattened_config_scores_and_group(sweep):
    _, folder, results = sweep
    for (prompt, pooling), res in results.items():
        (wandb_file,) = Path(res["run_dir"]).glob("wandb/offline-run-*/*.wandb")
        records = read_wandb_records(wandb_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        # grouped by the sweep folder (no time in its name: the name itself), named by what varies in the sweep
        assert (run.run_group, run.job_type, run.display_name) == (f"multirun/{folder.name}", "eval",
                                                                   f"pooling={pooling},prompt={prompt}")
        assert res["sweep"] == run.run_group and list(run.tags) == ["smollm2-135m"]
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert (config["prompt.name"], config["pooling.name"], config["model.name"]) == (prompt, pooling, "smollm2-135m")
        assert config["encode.max_length"] == 32 and config["prompt.template"] == res["prompt_template"]
        summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                   for i in r.summary.update if i.key}
        assert summary["mean"] == pytest.approx(res["mean"])
        assert {t: summary[f"scores.{t}"] for t in res["scores"]} == pytest.approx(res["scores"])
        tables = {i.nested_key[0] for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item
                  if len(i.nested_key) == 2 and i.nested_key[1] == "_type" and "table" in i.value_json}
        assert tables == {"scores"}


def test_rerun_reads_the_result_cache_and_overwrite_recomputes(sweep, tiny_data):
    work, _, results = sweep
    args = [*COMMON, f"data.root={tiny_data}", "prompt=eol", "pooling=last", "logger=none"]
    r = run_cli(*args, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (work / "outputs" / "runs").glob("*/results.json")
    again = json.loads(path.read_text())
    assert again["scores"] == results[("eol", "last")]["scores"]
    assert sorted(again["from_cache"]["scores"]) == ["arxiv/s2s", "clinc150/test"]
    assert again["encode"]["forward_calls"] == 0 and again["encode"]["cache_hits"] == 0  # not even embeddings read
    shutil.rmtree(path.parent)
    r = run_cli(*args, "eval.overwrite=true", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (work / "outputs" / "runs").glob("*/results.json")
    fresh = json.loads(path.read_text())
    assert fresh["from_cache"] == {"scores": []} and fresh["encode"]["cache_hits"] == 2  # re-scored from embeddings
    assert fresh["scores"] == pytest.approx(results[("eol", "last")]["scores"], abs=1e-9)
    shutil.rmtree(path.parent)


def test_joblib_launcher_runs_two_jobs_in_parallel_processes_from_the_cache(sweep, tiny_data):
    """hydra/launcher=joblib with 2 workers (each loads its own model); both configurations are finished in
    the grid, so the re-run sweep into a new folder reads every score from the result cache."""
    work, _, results = sweep
    folder = work / "outputs" / "multirun" / "joblib"
    r = run_cli("-m", *COMMON, f"data.root={tiny_data}", "prompt=none,eol", "pooling=mean", "logger=none",
                "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={folder}", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr
    again = {json.loads(p.read_text())["prompt"]: json.loads(p.read_text()) for p in folder.glob("*/results.json")}
    assert sorted(again) == ["eol", "none"]
    for prompt, res in again.items():
        assert res["scores"] == results[(prompt, "mean")]["scores"] and res["encode"]["forward_calls"] == 0
        assert sorted(res["from_cache"]["scores"]) == ["arxiv/s2s", "clinc150/test"]


def test_result_cache_key_covers_what_a_score_depends_on(backbone, tiny_data, tmp_path):
    from embedkit.data.clustering import load_jsonl_folder
    from embedkit.embed.encoder import Encoder
    from embedkit.evaluate.clustering import ClusteringEvaluator
    from embedkit.embed.models import Backbone
    from embedkit.embed.pooling import Pooling
    from embedkit.embed.prompts import Prompt
    from embedkit.evaluate.result_cache import ResultCache

    sets = load_jsonl_folder(str(tiny_data))
    ev = ClusteringEvaluator(cache=True, cache_dir=str(tmp_path))
    eol = Prompt("eol", 'This sentence: "{text}" means in one word:')
    base = ev.cache_fields(Encoder(backbone, eol, max_length=32), Pooling("last", "last"), sets[0])
    tuned = Backbone(**{**vars(backbone), "info": {**backbone.info, "adapter_sha256": "0123abcd"}})
    variants = [
        ev.cache_fields(Encoder(backbone, eol, max_length=64), Pooling("last", "last"), sets[0]),
        ev.cache_fields(Encoder(backbone, Prompt("none", "{text}"), max_length=32), Pooling("last", "last"), sets[0]),
        ev.cache_fields(Encoder(backbone, eol, max_length=32), Pooling("mean", "mean"), sets[0]),
        ev.cache_fields(Encoder(backbone, eol, max_length=32), Pooling("last", "last", normalize=True), sets[0]),
        ev.cache_fields(Encoder(backbone, eol, max_length=32), Pooling("last", "last"), sets[0].subsample(50, 0)),
        ClusteringEvaluator(n_seeds=3).cache_fields(Encoder(backbone, eol, max_length=32), Pooling("last", "last"), sets[0]),
        ev.cache_fields(Encoder(tuned, eol, max_length=32), Pooling("last", "last"), sets[0]),  # a fine-tuned adapter
    ]
    paths = {ev.cache.path(f) for f in [base, *variants]}
    assert len(paths) == 1 + len(variants)
    assert ev.cache_fields(Encoder(backbone, eol, max_length=32, batch_size=4), Pooling("last", "last"), sets[0]) == base
    ev.cache.put(base, 0.25)
    assert ev.cache.get(base) == 0.25 and ResultCache(tmp_path, overwrite=True).get(base) is None
    ev.cache.path(base).write_text('{"score": 0.2')  # a damaged entry is a miss, not a crash
    assert ev.cache.get(base) is None


def test_make_table_pooling_on_local_data_prints_the_table_and_reuses_finished_work(sweep, tiny_data):
    """`make table-pooling MODEL=smollm2-135m DATA=...` in the sweep's output root: the prompt=none jobs of the
    grid are finished (mean, last: result cache) or encoded (eos, weighted_mean: embedding cache)."""
    work, _, results = sweep
    env = {**os.environ, "EMBEDKIT_OUTPUTS": str(work / "outputs"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["make", "-o", ".venv/.installed", "table-pooling", "MODEL=smollm2-135m", f"DATA={tiny_data}",
                        "ARGS=encode.max_length=32 encode.show_progress=false logger=none"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (folder,) = (work / "outputs" / "tables" / "pooling").iterdir()
    table = {}
    for path in folder.glob("*/results.json"):
        res = json.loads(path.read_text())
        table[res["pooling"]] = res
        assert res["prompt"] == "none" and res["encode"]["forward_calls"] == 0
    assert list(table) and sorted(table) == ["eos", "last", "mean", "weighted_mean"]
    for pooling in ("mean", "last"):
        assert table[pooling]["scores"] == results[("none", pooling)]["scores"]
        assert len(table[pooling]["from_cache"]["scores"]) == 2
    assert "| model | mean | last | eos | weighted_mean |" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| smollm2-135m |"))
    assert [c.strip().strip("*") for c in row.strip("|").split("|")[1:]] == [
        f"{100 * table[p]['mean']:.1f}" for p in ("mean", "last", "eos", "weighted_mean")]
    assert (folder / "table-pooling.md").read_text() in r.stdout and (folder / "table-pooling.png").exists()


def test_report_skips_and_lists_broken_runs_and_names_missing_results(sweep, tmp_path, capsys):
    _, folder, results = sweep
    runs = tmp_path / "runs"
    for i, src in enumerate(sorted(folder.glob("*/results.json"))[:2]):
        (runs / f"ok{i}").mkdir(parents=True)
        shutil.copy(src, runs / f"ok{i}" / "results.json")
    text = (runs / "ok0" / "results.json").read_text()
    (runs / "half").mkdir()
    (runs / "half" / "results.json").write_text(text[: len(text) // 2])
    (runs / "noscores").mkdir()
    (runs / "noscores" / "results.json").write_text(json.dumps({k: v for k, v in json.loads(text).items()
                                                                if k != "scores"}))
    good, broken = scan([str(runs)])
    assert len(good) == 2
    assert {Path(p).parent.name: why.split(" (")[0] for p, why in broken} == {
        "half": "unreadable", "noscores": "missing field(s): scores"}
    report_main([str(runs), "--table", "prompts", "--no-plot"])
    captured = capsys.readouterr()
    assert "skipped 2 broken run(s)" in captured.err and "half/results.json" in captured.err
    (row,) = [line for line in captured.out.splitlines() if line.startswith("| smollm2-135m |")]
    assert row.replace("*", "") == ("| smollm2-135m | none | " + " | ".join(
        f"{100 * results[('none', q)]['mean']:.1f}" for q in ("mean", "last")) + " |")  # the two good runs

    (tmp_path / "empty").mkdir()
    for args, message in [([str(tmp_path / "empty")], "no finished runs (results.json) under"),
                          ([str(runs), "--table", "pooling", "--model", "llama-3.2-1b"],
                           "no results for model llama-3.2-1b under"),
                          ([str(tmp_path / "nowhere")], "does not exist")]:
        with pytest.raises(SystemExit) as exc:
            report_main(args)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_published_numbers_and_differences_only_for_the_same_task_set(sweep):
    """The reference data files hold the paper's two numbers and Qwen3-Embedding-0.6B's MTEB(eng, v2) scores;
    a difference is shown only next to runs on that task set (here: a real result relabelled to it)."""
    _, _, results = sweep
    refs = load_references()
    assert {(e["model"], e["prompt"], e["pooling"], e["mean"]) for e in refs["paper"]["entries"]} == {
        ("llama-3.2-1b", "none", "last", 33.2), ("llama-3.2-1b", "cluster", "last", 46.8)}
    qwen = refs["mteb_leaderboard"]["models"][0]
    assert sorted(qwen["scores"]) == sorted(refs["mteb_leaderboard"]["task_sets"]["mteb_clustering_v2"])
    assert sum(qwen["scores"].values()) / 8 == pytest.approx(qwen["mean"], abs=0.005)

    local = [results[("none", "mean")], results[("none", "last")]]
    t = pooling_table(local, refs)
    assert [row[0] for row in t.rows] == ["smollm2-135m"]  # no published numbers for it, no difference row
    v2 = refs["mteb_leaderboard"]["task_sets"]["mteb_clustering_v2"]
    relabelled = {**results[("none", "last")], "model": "llama-3.2-1b",
                  "scores": {name: results[("none", "last")]["mean"] for name in v2}}
    t = pooling_table([*local, relabelled], refs)
    rows = {row[0]: row[1:] for row in t.rows}
    ours = 100 * relabelled["mean"]
    assert rows["llama-3.2-1b (paper)"] == ["", "33.2"]
    assert rows["difference"] == ["", f"{ours - 33.2:+.1f}"]
    ref = reference_table([relabelled], refs)
    mean_row = ref.rows[-1]
    assert (mean_row[0], mean_row[2]) == ("mean (8 tasks)", f"{qwen['mean']:.1f}")
    assert mean_row[3] == f"{ours - 54.05:+.1f}"
    first = dict(zip(ref.header, ref.rows[0]))
    assert first["Qwen3-Embedding-0.6B (published)"] == f"{qwen['scores'][v2[0]]:.1f}"


@pytest.mark.parametrize("experiment, params, data", [
    ("table_pooling", {"prompt": "none", "pooling": "mean,last,eos,weighted_mean"}, "mteb_tasks"),
    ("table_prompts", {"prompt": "glob(*)", "pooling": "mean,last,eos,weighted_mean"}, "mteb_tasks"),
    ("table_finetune", {"augmentation": "noise,paraphrase,backtranslation", "pooling": "mean,last"}, "mteb_tasks"),
    ("table_reference", {"prompt": "none,cluster", "pooling": "mean,last"}, "mteb_tasks"),
])
def test_table_experiments_compose_with_their_sweep_and_launchers(experiment, params, data):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "hydra/launcher=slurm"], return_hydra_config=True)
        assert dict(cfg.hydra.sweeper.params) == params
        assert cfg.data._target_ == f"embedkit.data.{data}"
        assert Path(cfg.hydra.sweep.dir).parts[-3:-1] == ("tables", experiment.removeprefix("table_"))
        assert cfg.hydra.launcher.gpus_per_node == 1 and "SlurmLauncher" in cfg.hydra.launcher._target_
        if experiment == "table_finetune":
            assert (cfg.train.name, cfg.prompt.name) == ("lora_paper", "cluster")
        local = compose("config", overrides=[f"experiment={experiment}", "hydra/launcher=local_parallel",
                                             "data=jsonl", "data.root=/x"], return_hydra_config=True)
        assert local.hydra.launcher.n_jobs == 2 and "JoblibLauncher" in local.hydra.launcher._target_
        assert local.data._target_ == "embedkit.data.load_jsonl_folder"  # DATA=... replaces the MTEB tasks


def test_table_of_an_unknown_layout_or_without_matching_runs_is_a_clear_error(sweep):
    _, _, results = sweep
    with pytest.raises(EmbedkitError, match="without a prompt"):
        pooling_table([results[("eol", "last")]], load_references())


def test_adapt_table_puts_the_recipe_seeds_beside_the_untuned_best_and_the_peer(tmp_path):
    """``--table adapt`` from hand-written runs: per set the untuned best cell, the recipe's mean +- std over
    seeds, the peer, the margin and the seeds that win; a bar chart; an error without fine-tuned runs."""
    from embedkit.report.adapt import adapt_table
    from embedkit.report.outputs import table_report

    tasks = ["a", "b"]
    def run(folder, model, prompt, pooling, scores, **extra):
        r = {"model": model, "prompt": prompt, "pooling": pooling, "scores": dict(zip(tasks, scores)),
             "mean": sum(scores) / len(scores), **extra}
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "results.json").write_text(json.dumps(r))
    run("untuned/0", "smollm2-135m", "eol", "last", [0.40, 0.50])
    run("untuned/1", "smollm2-135m", "none", "mean", [0.45, 0.30])
    for seed, after in enumerate([[0.60, 0.70], [0.62, 0.66], [0.58, 0.74]]):
        run(f"recipe/{seed}", "smollm2-135m", "eol", "last", after, seed=seed,
            scores_before={"a": 0.40, "b": 0.50}, mean_before=0.45,
            train={"steps": 50, "stopped_by": "steps", "wall_s": 540.0 + seed, "pairs_seen": 1600,
                   "pairs": {"name": "news"}})
    run("peer", "minilm", "n/a", "mean", [0.61, 0.65], peer={"modules": []})
    from embedkit.report.results import load_results
    t = adapt_table(load_results([str(tmp_path)]))
    header, rows = t.sections[0][1], t.sections[0][2]
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    assert cells["a"]["untuned best (config)"] == "45.0 (none/mean)"
    assert cells["b"]["untuned best (config)"] == "50.0 (eol/last)"
    assert cells["a"]["recipe before"] == "40.0 +- 0.0"  # the same base model under every seed
    assert cells["a"]["recipe after"] == "60.0 +- 2.0" and cells["a"]["minilm"] == "61.0"
    assert cells["a"]["after - best peer"] == "-1.0" and cells["a"]["wins"] == "1/3"
    assert cells["b"]["recipe after"] == "70.0 +- 4.0" and cells["b"]["wins"] == "3/3"
    assert cells["**mean**"]["recipe after"] == "65.0 +- 1.0" and cells["**mean**"]["wins"] == "3/3"
    assert [r[0] for r in t.sections[1][2]] == ["0", "1", "2"]
    assert "news" in t.notes[0] and "9.0 min per seed" in t.notes[0]
    md, written = table_report([str(tmp_path)], "adapt", str(tmp_path / "out"))
    assert "Adaptation recipe: smollm2-135m before and after 3 seed(s), beside minilm" in md
    assert (tmp_path / "out" / "table-adapt.png").stat().st_size > 1000
    with pytest.raises(EmbedkitError, match="no fine-tuned runs"):
        adapt_table([r for r in load_results([str(tmp_path)]) if "train" not in r])
