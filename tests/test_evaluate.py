"""The evaluator's two paths: local sets (built into mteb tasks) and registry tasks (MtebTask)."""

import pytest

from embedkit.data import MtebTask, load_jsonl_folder
from embedkit.encoder import Encoder
from embedkit.evaluate import ClusteringEvaluator, mteb_task
from embedkit.pooling import Pooling
from embedkit.prompts import Prompt


def test_a_registry_style_task_scores_like_the_local_set(backbone, clustering_root, tmp_path):
    cs = load_jsonl_folder(str(clustering_root), include=["arxiv/s2s.jsonl"], max_rows=200)[0]
    enc = Encoder(backbone, Prompt("eol", 'This sentence: "{text}" means in one word:'), max_length=32,
                  cache_dir=tmp_path, show_progress=False)
    ev = ClusteringEvaluator("legacy")
    local = ev.evaluate(enc, Pooling("last", "last"), [cs])["arxiv/s2s"]
    wrapped = MtebTask(mteb_task(cs, "legacy"))  # what data=mteb gives, minus the download
    assert wrapped.describe()["main_score"] == "v_measure"
    assert ev.evaluate(enc, Pooling("last", "last"), [wrapped])["arxiv/s2s"] == pytest.approx(local, abs=1e-9)
    assert enc.forward_calls > 0 and enc.cache_hits == 1  # the second evaluation re-used the embeddings
    v2 = ClusteringEvaluator("v2").evaluate(enc, Pooling("last", "last"), [cs])["arxiv/s2s"]
    assert 0 < v2 <= 1 and 0 < local <= 1
