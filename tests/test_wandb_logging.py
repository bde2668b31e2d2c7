"""What a W&B dashboard gets, read back from offline runs (the ``.wandb`` record file and its ``files/media``):
the run's group, name, tags and job type; per-step history; tables; images from the report and the
attention analysis; and the report run of ``embedkit-report --wandb``. One real CLI run (a tiny
fine-tune); the rest calls the loggers and the report/attention code directly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA, read_wandb_records, run_cli
from embedkit.loggers import WandbLogger, results_table, started

TIME = "2026-12-03_15-39-00"


def offline_run(folder: Path) -> tuple[Path, list]:
    """(files folder, records) of the one offline W&B run under ``folder``/wandb, once its exit record is
    written: wandb's service process can still be writing the file when ``finish`` has returned."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return path.parent / "files", records
        assert time.monotonic() < deadline, f"{path}: no exit record after 30 s"
        time.sleep(0.2)


def run_info(records) -> tuple:
    """(group, name, tags, job type, project) of the run record."""
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run.run_group, run.display_name, list(run.tags), run.job_type, run.project


def history(records) -> list[dict]:
    """Each history row as {dotted key: value}."""
    return [{".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def logged_file(files: Path, rows: list[dict], key: str) -> Path:
    """The media file a history row logged under ``key`` (a table or an image)."""
    (path,) = [row[f"{key}.path"] for row in rows if f"{key}.path" in row]
    return files / path


def exit_code(records) -> int:
    (code,) = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return code


def result(model="smollm2-135m", prompt="eol", pooling="mean", layer=-1, span="all", mean=0.4, sweep=None,
           run_dir="", trained=False, tags=("table_levers",)) -> dict:
    """A results.json as ``embedkit.run.assemble_results`` writes it, with the fields the report reads."""
    scores = {"arxiv/s2s": mean - 0.01, "clinc150/test": mean + 0.01}
    out = {"model": model, "prompt": prompt, "pooling": pooling, "scores": scores, "mean": mean,
           "pooling_spec": {"mode": pooling, "normalize": False, "layer": layer, "span": span, "final_norm": "auto",
                            "layers_resolved": layer if isinstance(layer, list) else [layer if layer >= 0 else 29]},
           "sweep": sweep, "run_dir": run_dir,
           "config": {"tags": list(tags), "train": {"name": "lora" if trained else "none"},
                      "logger": {"_target_": "embedkit.loggers.WandbLogger", "project": "embedkit-test",
                                 "entity": None, "mode": "offline", "group": None, "tags": []}}}
    if trained:
        out |= {"train": {"steps": 2}, "scores_before": {k: v - 0.05 for k, v in scores.items()},
                "mean_before": mean - 0.05}
    return out


def test_results_table_has_a_row_per_task_and_the_before_column_only_for_tuned_runs():
    plain, tuned = result(), result(pooling="last", layer=[20, 21], trained=True, run_dir="/x/1_job", sweep="s/t")
    columns, rows = results_table([plain])
    assert columns == ["task", "v_measure", "model", "prompt", "pooling", "layer", "span", "train"]
    assert rows[0] == ["arxiv/s2s", pytest.approx(0.39), "smollm2-135m", "eol", "mean", -1, "all", "none"]
    columns, rows = results_table([plain, tuned], with_run=True)
    assert columns[:5] == ["run", "sweep", "task", "v_measure", "v_measure_before"] and len(rows) == 4
    by = {(r[0], r[2]): dict(zip(columns, r)) for r in rows}
    assert by[("1_job", "clinc150/test")]["v_measure_before"] == pytest.approx(0.36)
    assert by[("", "clinc150/test")]["v_measure_before"] is None  # untuned: no score before
    assert by[("1_job", "arxiv/s2s")]["layer"] == [20, 21] and by[("1_job", "arxiv/s2s")]["train"] == "lora"


def test_swept_keys_are_the_sweep_overrides_and_sweeper_params_with_several_values(tmp_path):
    """What names a sweep's runs: the keys its ``multirun.yaml`` (written by Hydra's basic sweeper) varies."""
    from embedkit.commands.common import swept_keys

    assert swept_keys(tmp_path) is None  # another sweeper (Optuna): the run names keep all overrides
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: [data=jsonl, 'prompt=none,eol', encode.max_length=32]\n"
        "  sweeper:\n    params:\n      pooling: mean,last\n      pooling.layer: range(0,30)\n      seed: 1\n"
        "paths:\n  output_root: ${oc.env:NOT_SET_ANYWHERE}\n")
    assert swept_keys(tmp_path) == {"prompt", "pooling", "pooling.layer"}


def test_logger_writes_group_name_tags_steps_a_table_and_the_report_figures_as_images(tmp_path):
    """The logger class alone, with the report's real figures (heat map, levers layer plot)."""
    from embedkit.report.figures import heatmap
    from embedkit.report.levers import LeverTables

    heat = tmp_path / "report.png"
    heatmap(heat, "mean V-measure x100", "prompt", "pooling", ["none", "eol"], ["mean", "last"],
            {("none", "mean"): 30.0, ("none", "last"): 25.0, ("eol", "mean"): 40.0, ("eol", "last"): 45.0})
    levers = LeverTables("levers", [], curves={"mean": {0: 0.2, 1: 0.35, 2: 0.3}, "last": {0: 0.1, 1: 0.2, 2: 0.4}})
    assert levers.line_plot(tmp_path / "table-levers.png")

    logger = WandbLogger(project="embedkit-test", mode="offline", tags=["configured"])
    group = f"table_levers_layers/{TIME}"
    with started(logger, {"prompt": {"name": "eol"}, "pooling": {"layer": 3}}, "pooling.layer=3,pooling=mean",
                 group, "train", tmp_path, tags=["table_levers", "smollm2-135m", "configured", ""]):
        for step in (1, 2, 3):
            logger.log({"train/loss": 1.0 / step, "train/lr": 1e-3 * step}, step=step)
        # the layer column mixes a number and a list: logged as text, as W&B requires one type per column
        logger.table("scores", *results_table([result(layer=3), result(layer=[20, 21], trained=True)]))
        logger.images({"report": heat, "table-levers": tmp_path / "table-levers.png"})
    assert "offline run" in logger.location and "wandb sync" in logger.location

    files, records = offline_run(tmp_path)
    assert run_info(records) == (group, "pooling.layer=3,pooling=mean", ["configured", "table_levers", "smollm2-135m"],
                                 "train", "embedkit-test")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert (config["prompt.name"], config["pooling.layer"]) == ("eol", 3)
    rows = history(records)
    steps = [(r["_step"], r["train/loss"], r["train/lr"]) for r in rows if "train/loss" in r]
    assert steps == [(1, 1.0, pytest.approx(1e-3)), (2, 0.5, pytest.approx(2e-3)), (3, pytest.approx(1 / 3), 3e-3)]
    table = json.loads(logged_file(files, rows, "scores").read_text())
    assert table["columns"] == ["task", "v_measure", "v_measure_before", "model", "prompt", "pooling", "layer", "span",
                                "train"]
    assert [r[6] for r in table["data"]] == ["3", "3", "[20, 21]", "[20, 21]"]
    assert [r[2] for r in table["data"]] == [None, None, pytest.approx(0.34), pytest.approx(0.36)]
    for key, source in (("report", heat), ("table-levers", tmp_path / "table-levers.png")):
        image = logged_file(files, rows, key)
        assert image.parent.name == "images" and image.read_bytes() == source.read_bytes()
    assert exit_code(records) == 0


def test_a_failed_block_still_finishes_the_run_marked_failed(tmp_path):
    logger = WandbLogger(mode="offline")
    with pytest.raises(RuntimeError, match="boom"):
        with started(logger, {}, "job", "g/t", "eval", tmp_path):
            logger.log({"x": 1}, step=1)
            raise RuntimeError("boom")
    assert logger.run is None
    _, records = offline_run(tmp_path)
    assert exit_code(records) == 1 and run_info(records)[:2] == ("g/t", "job")


def test_report_wandb_logs_tables_and_pngs_as_one_report_run_in_the_runs_group(tmp_path, capsys):
    """``embedkit-report DIR --wandb``: the heat map and the per-run table in the sweep's group; ``--table
    levers --wandb`` over two sweeps: no common group, the layer plot and each table section."""
    from embedkit.commands.report import main as report_main

    top = tmp_path / "levers" / TIME
    runs = {"layers": [result(pooling=m, layer=b, mean=0.3 + 0.01 * b + (m == "last") * 0.02,
                              sweep=f"table_levers_layers/{TIME}") for m in ("mean", "last") for b in range(4)],
            "span": [result(pooling="mean", span=s, mean=0.4 + (s == "text") * 0.01, sweep=f"table_levers_span/{TIME}")
                     for s in ("all", "text")]}
    for part, results in runs.items():
        for i, r in enumerate(results):
            r["run_dir"] = str(top / part / f"{i}_job")
            (top / part / f"{i}_job").mkdir(parents=True)
            (top / part / f"{i}_job" / "results.json").write_text(json.dumps(r))

    report_main([str(top / "layers"), "--wandb"])
    out = capsys.readouterr().out
    assert f"W&B: run 'report' (job_type report) in group table_levers_layers/{TIME}: offline run" in out
    files, records = offline_run(top / "layers")
    assert run_info(records) == (f"table_levers_layers/{TIME}", "report", ["table_levers", "smollm2-135m"], "report",
                                 "embedkit-test")  # the runs' logger settings: their project
    rows = history(records)
    table = json.loads(logged_file(files, rows, "runs").read_text())
    assert table["columns"][:4] == ["run", "sweep", "task", "v_measure"] and len(table["data"]) == 8 * 2
    assert sorted({r[0] for r in table["data"]}) == [f"{i}_job" for i in range(8)]
    assert logged_file(files, rows, "report").read_bytes() == (top / "layers" / "report.png").read_bytes()

    report_main([str(top), "--table", "levers", "--wandb"])
    out = capsys.readouterr().out
    assert "W&B: run 'table-levers' (job_type report) in no group (2 sweeps)" in out
    files, records = offline_run(top)
    group, name, tags, job_type, _ = run_info(records)
    assert (group, name, job_type) == ("", "table-levers", "report")
    rows = history(records)
    assert len(json.loads(logged_file(files, rows, "runs").read_text())["data"]) == 10 * 2
    layers = json.loads(logged_file(files, rows, "table-levers/1").read_text())
    assert layers["columns"] == ["section", "block", "last", "mean"]
    assert [r[1] for r in layers["data"]] == ["0", "1", "2", "3", "29"]  # the span sweep's span=all run: block 29
    span = json.loads(logged_file(files, rows, "table-levers/2").read_text())
    assert span["columns"][-3:] == ["span=all", "span=text", "change"] and span["data"][0][-1] == "+1.0"
    assert logged_file(files, rows, "table-levers").read_bytes() == (top / "table-levers.png").read_bytes()


def test_attention_charts_and_tables_go_to_one_attention_run(tmp_path, capsys):
    """``embedkit-attention logger=wandb``: the Hydra job's labels (``run_labels``), then ``run_attention`` and
    ``log_attention`` in process: both PNGs as images, the example rows and the aggregate as tables."""
    from hydra import compose, initialize_config_module
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from embedkit.attention.analysis import run_attention
    from embedkit.attention.outputs import log_attention
    from embedkit.commands.common import run_labels
    from hydra.utils import instantiate

    out = tmp_path / "attention" / f"{TIME}_smollm2-135m_cluster"
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        full = compose("attention", return_hydra_config=True, overrides=[
            "model.dtype=float32", "attention.texts=['The new graphics card renders games fast.']",
            "attention.n_texts=2", "attention.max_length=16", "data=jsonl", f"data.root={SHARED_DATA / 'clustering'}",
            "data.include=[arxiv/s2s.jsonl]", "logger=wandb", "logger.mode=offline", f"attention.output_dir={out}"])
    hc = full.hydra
    with open_dict(hc):
        hc.mode, hc.runtime.output_dir = RunMode.RUN, str(out)
    name, group = run_labels(hc, "attention")
    assert group == f"attention/{TIME}"  # the time in the run folder's name
    assert name == ("attention.max_length=16,attention.n_texts=2,attention.texts=['The new graphics card renders "
                    "games fast.'],data=jsonl,model.dtype=float32")  # without data.root, data.include, logger.*
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    summary = run_attention(cfg, out)
    log_attention(instantiate(cfg.logger), summary, name, group)
    assert "logged: offline run" in capsys.readouterr().out

    files, records = offline_run(out)
    assert run_info(records) == (group, name, ["smollm2-135m"], "attention", "embedkit")
    rows = history(records)
    for key in ("example_0", "aggregate_layers"):
        assert logged_file(files, rows, key).read_bytes() == (out / f"{key}.png").read_bytes()
    aggregate = json.loads(logged_file(files, rows, "aggregate").read_text())
    assert aggregate["columns"][:3] == ["task", "variant", "layers"]
    assert aggregate["data"][0][:2] == ["arxiv/s2s", "base"]
    examples = json.loads(logged_file(files, rows, "examples").read_text())
    assert [r[:3] for r in examples["data"]] == [[0, "The new graphics card renders games fast.", "base"]]


def test_a_fine_tune_logs_its_curve_scores_before_and_after_and_its_labels(tmp_path, clustering_root):
    """One real CLI run: ``experiment=demo_train`` shrunk to 2 steps: group ``demo_train/<run time>``, name =
    the overrides without the excluded keys (data.root, data.include, logger), tags = the experiment's
    and the model, job_type train, loss and lr at steps 1 and 2, the score table with the score before."""
    r = run_cli("experiment=demo_train", "data=jsonl", f"data.root={clustering_root}", "data.include=[arxiv/s2s.jsonl]",
                "data.max_rows=16", "encode.max_length=12", "encode.show_progress=false", "model.dtype=float32",
                "pairs.max_rows=4", "train.batch_size=2", "train.chunk_size=2", "train.max_length=12",
                "train.max_steps=2", "logger=wandb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*")
    res = json.loads((run_dir / "results.json").read_text())
    files, records = offline_run(run_dir)
    time = run_dir.name[:len(TIME)]
    assert res["sweep"] == f"demo_train/{time}"
    assert run_info(records) == (f"demo_train/{time}", "data.max_rows=16,data=jsonl,encode.max_length=12,"
                                 "model.dtype=float32,pairs.max_rows=4,train.batch_size=2,"
                                 "train.chunk_size=2,train.max_length=12,train.max_steps=2",
                                 ["demo", "smollm2-135m"], "train", "embedkit")
    rows = history(records)
    curve = [(row["_step"], row["train/loss"], row["train/lr"]) for row in rows if "train/loss" in row]
    assert curve == [(1, pytest.approx(res["train"]["first_loss"]), pytest.approx(1.5e-4)),
                     (2, pytest.approx(res["train"]["final_loss"]), 0.0)]  # demo_train's lr 3e-4, linear decay
    table = json.loads(logged_file(files, rows, "scores").read_text())
    assert table["columns"][:3] == ["task", "v_measure", "v_measure_before"]
    assert table["data"] == [["arxiv/s2s", pytest.approx(res["scores"]["arxiv/s2s"]),
                              pytest.approx(res["scores_before"]["arxiv/s2s"]), "smollm2-135m", "eol", "last", -1,
                              "all", "lora"]]
