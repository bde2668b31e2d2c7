import logging

import numpy as np
import pytest
import torch

from embedkit.embed.encoder import Encoder, length_batches
from embedkit.errors import EmbedkitError
from embedkit.embed.pooling import MODES, Pooling
from embedkit.embed.prompts import Prompt

TEXTS = [
    "Re: Best GPU for deep learning?",
    "Stars form in dense molecular clouds when gravity overcomes gas pressure.",
    "hi",
    "The committee postponed the vote on the new budget until next week because several members were absent.",
]


@pytest.fixture(scope="module")
def encoder(backbone):
    return Encoder(backbone, Prompt("eol", 'This sentence: "{text}" means in one word:'), max_length=64,
                   batch_size=8, show_progress=False)


def test_every_pooling_matches_a_hand_computation_on_a_left_padded_batch(encoder, backbone):
    pooled = encoder.encode_all(TEXTS)  # one batch of 4 rows of different lengths: left padding
    assert encoder.forward_calls == 1
    for i, item in enumerate(encoder.tokenize(TEXTS)):
        ids = torch.tensor([item.ids])  # alone: no padding at all
        with torch.no_grad():
            h = backbone.model(input_ids=ids).last_hidden_state[0].float()
        content = h[:-1]  # everything but the appended EOS
        w = torch.arange(1, len(content) + 1, dtype=torch.float32)[:, None]
        expected = {
            "mean": content.mean(0),
            "last": h[-2],
            "eos": h[-1],
            "weighted_mean": (w * content).sum(0) / w.sum(),
        }
        for mode, vec in expected.items():
            np.testing.assert_allclose(pooled[mode][i], vec.numpy(), rtol=1e-4, atol=2e-4, err_msg=mode)
        # concat: [mean / |mean|, last / |last|] of the same hand-computed vectors
        concat = Pooling("concat", "concat").select(pooled)[i]
        dim = h.shape[1]
        np.testing.assert_allclose(concat[:dim], (expected["mean"] / expected["mean"].norm()).numpy(), atol=1e-5)
        np.testing.assert_allclose(concat[dim:], (expected["last"] / expected["last"].norm()).numpy(), atol=1e-5)


def test_concat_and_normalize():
    pooled = {m: np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32) * 7 for m in
              ("mean", "last", "eos", "weighted_mean")}
    cat = Pooling("concat", "concat").select(pooled)
    assert cat.shape == (3, 10)
    for half, mode in ((cat[:, :5], "mean"), (cat[:, 5:], "last")):
        np.testing.assert_allclose(half, pooled[mode] / np.linalg.norm(pooled[mode], axis=1, keepdims=True), rtol=1e-6)
    torch_cat = Pooling("concat", "concat", normalize=True).select({m: torch.from_numpy(v) for m, v in pooled.items()})
    np.testing.assert_allclose(torch_cat.numpy(), cat / np.sqrt(2), rtol=1e-6)  # two unit halves: norm sqrt(2)
    unit = Pooling("mean", "mean", normalize=True).select(pooled)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(Pooling("last", "last").select(pooled), pooled["last"])


def test_unknown_pooling_mode_names_the_choices():
    with pytest.raises(EmbedkitError, match="mean, last, eos, weighted_mean, concat"):
        Pooling("x", "meen")


def test_one_forward_pass_serves_every_pooling_and_the_cache_serves_reruns(backbone, tmp_path, monkeypatch, caplog):
    import embedkit.embed.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "_MEMO", {})  # no embeddings of earlier tests in memory
    calls = []
    hook = backbone.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        enc = Encoder(backbone, Prompt("none", "{text}"), max_length=32, batch_size=2, cache_dir=tmp_path,
                      show_progress=False)
        texts = TEXTS + TEXTS[:2]  # duplicates are encoded once
        vectors = {p: enc.encode(texts, Pooling(p, p)) for p in MODES}
        assert len(calls) == 2  # 4 unique texts in batches of 2; all 5 poolings from those passes
        assert all(v.shape[0] == len(texts) for v in vectors.values())
        np.testing.assert_array_equal(vectors["mean"][4], vectors["mean"][0])
        again = Encoder(backbone, Prompt("none", "{text}"), max_length=32, batch_size=2, cache_dir=tmp_path,
                        show_progress=False)
        np.testing.assert_array_equal(again.encode(texts, Pooling("eos", "eos")), vectors["eos"])
        assert len(calls) == 2 and again.cache_hits == 1  # a re-run does no model work (served from memory)
        # the file on disk, as a new process sees it: the in-memory copy is gone (written in the background:
        # a run waits for its cache files before it ends, as flush_cache_writes does here)
        encoder_module.flush_cache_writes()
        (stored,) = tmp_path.rglob("*.npz")
        encoder_module._MEMO.clear()
        fresh = Encoder(backbone, Prompt("none", "{text}"), max_length=32, batch_size=2, cache_dir=tmp_path,
                        show_progress=False)
        with caplog.at_level(logging.INFO, logger="embedkit.embed.encoder"):
            from_disk = fresh.encode_all(texts)
        assert f"encoding: {len(texts)} texts from the embedding cache" in caplog.text  # the file, not memory
        assert len(calls) == 2 and fresh.forward_calls == 0 and fresh.texts_encoded == 0 and fresh.cache_hits == 1
        for p in MODES:
            np.testing.assert_array_equal(Pooling(p, p).select(from_disk), vectors[p], err_msg=p)
        with np.load(stored) as z:
            np.testing.assert_array_equal(z["mean"], vectors["mean"])
        assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind
    finally:
        hook.remove()


def test_length_batches_respects_rows_and_token_budget():
    lengths = [5, 50, 7, 30, 30, 2]
    batches = length_batches(lengths, batch_size=3, max_tokens=70)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 70)
    assert batches[0] == [1]  # longest first, alone because 2 x 50 > 70
