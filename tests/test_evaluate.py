"""The evaluator's two paths: local sets (built into mteb tasks) and registry tasks (MtebTask), and its
scores against scikit-learn run by hand the way mteb's evaluators run it."""

import random

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import v_measure_score

from embedkit.data import MtebTask, load_jsonl_folder
from embedkit.embed.encoder import Encoder
from embedkit.evaluate.clustering import ClusteringEvaluator, mteb_task
from embedkit.embed.pooling import Pooling
from embedkit.embed.prompts import Prompt

LAST = Pooling("last", "last")


def legacy_v_measure(embeddings, labels, seed):
    """mteb's AbsTaskClusteringLegacy (mteb/_evaluators/clustering_evaluator.py): one mini-batch k-means on
    every document, k = number of labels, batch 500, n_init="auto", random_state = the seed."""
    km = MiniBatchKMeans(n_clusters=len(set(labels)), batch_size=500, n_init="auto", compute_labels=True,
                         random_state=seed).fit(embeddings)
    return v_measure_score(labels, km.labels_)


def v2_v_measure(embeddings, labels, seed, n_runs=10):
    """mteb's AbsTaskClustering (mteb/abstasks/clustering.py) with every document embedded and
    max_documents_per_cluster = the set's size: 10 k-means runs (batch 512, k-means++, n_init 1) on
    samples of that size drawn with replacement by random.Random(seed); V-measure averaged."""
    labels = np.array(labels)
    rng = random.Random(seed)
    km = MiniBatchKMeans(n_clusters=len(set(labels)), batch_size=512, init="k-means++", n_init=1, random_state=seed)
    scores = []
    for _ in range(n_runs):
        idx = rng.choices(range(len(labels)), k=len(labels))
        scores.append(v_measure_score(labels[idx], km.fit_predict(embeddings[idx])))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def arxiv(clustering_root):
    return load_jsonl_folder(str(clustering_root), include=["arxiv/s2s.jsonl"], max_rows=200)[0]


@pytest.fixture(scope="module")
def encoded(backbone, arxiv, tmp_path_factory):
    """The encoder (with an embedding cache) and the set's last-token embeddings, encoded once."""
    enc = Encoder(backbone, Prompt("eol", 'This sentence: "{text}" means in one word:'), max_length=32,
                  cache_dir=tmp_path_factory.mktemp("embeddings"), show_progress=False)
    embeddings = enc.encode(arxiv.texts, LAST)
    assert enc.texts_encoded == len(set(arxiv.texts))
    return enc, embeddings


def test_a_registry_style_task_scores_like_the_local_set(arxiv, encoded):
    cs, (enc, embeddings) = arxiv, encoded
    calls, hits = enc.forward_calls, enc.cache_hits
    ev = ClusteringEvaluator("legacy")
    local = ev.evaluate(enc, LAST, [cs])["arxiv/s2s"]
    wrapped = MtebTask(mteb_task(cs, "legacy"))  # what data=mteb gives, minus the download
    assert wrapped.describe()["main_score"] == "v_measure"
    assert ev.evaluate(enc, LAST, [wrapped])["arxiv/s2s"] == pytest.approx(local, abs=1e-9)
    assert enc.forward_calls == calls and enc.cache_hits == hits + 2  # both evaluations re-used the embeddings

    # the same embeddings and labels through scikit-learn, as mteb's evaluators run it
    assert local == pytest.approx(legacy_v_measure(embeddings, cs.labels, 42), abs=1e-12)
    v2 = ClusteringEvaluator("v2").evaluate(enc, LAST, [cs])["arxiv/s2s"]
    assert v2 == pytest.approx(v2_v_measure(embeddings, cs.labels, 42), abs=1e-12)


def test_n_seeds_averages_k_means_runs_with_seeds_42_and_up(arxiv, encoded):
    """eval.n_seeds=2 is the mean of the runs with seeds 42 and 43, for both evaluators (mteb's legacy
    evaluator ignores the task's seed unless embedkit hands it on)."""
    enc, embeddings = encoded
    legacy = [legacy_v_measure(embeddings, arxiv.labels, seed) for seed in (42, 43)]
    assert abs(legacy[0] - legacy[1]) > 1e-3  # the seeds give different clusterings here, so the mean tells
    ev = ClusteringEvaluator("legacy", n_seeds=2)
    assert ev.describe()["kmeans_seeds"] == [42, 43]
    assert ev.evaluate(enc, LAST, [arxiv])["arxiv/s2s"] == pytest.approx(np.mean(legacy), abs=1e-12)
    v2 = [v2_v_measure(embeddings, arxiv.labels, seed) for seed in (42, 43)]
    assert ClusteringEvaluator("v2", n_seeds=2).evaluate(enc, LAST, [arxiv])["arxiv/s2s"] == pytest.approx(
        np.mean(v2), abs=1e-12)
