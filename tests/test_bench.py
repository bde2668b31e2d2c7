"""The fast encoder against the paper's loop (correctness, not speed), the OOM retry, and a smoke run of
``make bench`` on tiny inputs (its numbers are measured by ``make bench``, never asserted here)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.embed.encoder import Encoder
from embedkit.embed.models import cpu_supports_bf16
from embedkit.embed.pooling import MODES, Pooling
from embedkit.embed.prompts import Prompt, tokenize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from baselines import paper_encode  # noqa: E402

TEXTS = [
    "Return the absolute value of a number.",
    "x",
    "A fully differential calculation in perturbative quantum chromodynamics is presented for the production "
    "of massive photon pairs at hadron colliders, including all next-to-leading order contributions.",
    "Open a file and return a stream.",
    "Deprecated alias.",
    "The region of phase space is specified in which the calculation is most reliable; good agreement is "
    "demonstrated with data from the Fermilab Tevatron, and predictions are made for more detailed tests.",
    "can you make reservations at steak 'n' shake",
    "Create a new socket using the given address family, socket type and protocol number.",
]
EOL = Prompt("eol", 'This sentence: "{text}" means in one word:')


@pytest.fixture(scope="module")
def causal_lm(backbone):
    """The CausalLM with the same weights as the session backbone (what the paper's code loads)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(backbone.source, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(backbone):
    """embedkit's encoder, length-sorted under a small token budget so texts of different widths share
    batches (left padding inside a batch) and the input order must be restored."""
    return Encoder(backbone, EOL, max_length=64, batch_size=3, max_tokens=150, show_progress=False).encode_all(TEXTS)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encoder_matches_the_paper_loop_for_every_pooling(backbone, causal_lm, ours, padding_side):
    seqs = [t.ids for t in tokenize(backbone.tokenizer, EOL, TEXTS, 64)]
    base = paper_encode(causal_lm, seqs, backbone.tokenizer.pad_token_id, batch_size=4, padding_side=padding_side)
    for mode in MODES:
        pooling = Pooling(mode, mode)
        a, b = pooling.select(ours), pooling.select(base)
        assert a.shape == (len(TEXTS), backbone.model.config.hidden_size * (2 if mode == "concat" else 1))
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, atol=2e-4 * scale, rtol=0, err_msg=f"{mode}, {padding_side} padding")


def test_unsorted_single_text_batches_give_the_same_embeddings(backbone, ours):
    one_by_one = Encoder(backbone, EOL, max_length=64, batch_size=1, max_tokens=10_000, show_progress=False)
    single = one_by_one.encode_all(TEXTS)
    assert one_by_one.forward_calls == len(TEXTS)
    for mode in single:
        np.testing.assert_allclose(single[mode], ours[mode], atol=2e-4 * np.abs(single[mode]).max(), rtol=0)


def test_out_of_memory_is_retried_with_smaller_batches(backbone, ours, monkeypatch, caplog):
    import embedkit.embed.encoder as encoder_module

    real = encoder_module.pooled_views

    def small_gpu(model, ids, *args, **kwargs):
        if ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(encoder_module, "pooled_views", small_gpu)
    enc = Encoder(backbone, EOL, max_length=64, batch_size=4, max_tokens=10_000, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="embedkit.embed.encoder"):
        out = enc.encode_all(TEXTS)
    assert enc.forward_calls == len(TEXTS)
    assert "out of GPU memory on a batch of 4 texts" in caplog.text and "lower encode.max_tokens" in caplog.text
    for mode in out:
        np.testing.assert_allclose(out[mode], ours[mode], atol=2e-4 * np.abs(out[mode]).max(), rtol=0)


def test_out_of_memory_on_one_text_is_a_message(backbone, monkeypatch):
    import embedkit.embed.encoder as encoder_module
    from embedkit.errors import EmbedkitError

    def no_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(encoder_module, "pooled_views", no_gpu)
    enc = Encoder(backbone, EOL, max_length=64, batch_size=2, max_tokens=10_000, show_progress=False)
    with pytest.raises(EmbedkitError, match="out of GPU memory on a single text.*encode.max_length"):
        enc.encode_all(TEXTS[:2])


def test_bench_smoke(tmp_path):
    """``experiments/bench.py`` end to end on a 2-layer random model: every section runs and the summary
    holds the ratios; the fast and the baseline paths agree."""
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "experiments/bench.py"), "--profile", "smoke", "--models",
                          "tiny-llama", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    r = data["models"]["tiny-llama"]
    summary = {row["key"]: row for row in data["summary"]}
    for kind in ("short", "long"):
        e = r[f"encode_{kind}"]
        assert e["cosine_last_vs_baseline"] > 0.9999
        # the speedup is the ratio of the two measured throughputs, and the summary reports that number
        assert e["speedup"] == pytest.approx(e["ours_texts_per_s"] / e["baseline_texts_per_s"], rel=0.01, abs=0.01)
        row = summary[f"encode_{kind}_speedup"]
        assert (row["baseline"], row["ours"], row["value"]) == (e["baseline_texts_per_s"], e["ours_texts_per_s"],
                                                                 e["speedup"])
        assert row["met"] == (e["speedup"] >= (5 if cpu_supports_bf16() else 3))  # the CPU goal of this CPU kind
        # the pass's TFLOP/s against this machine's own matmul rate, measured in the same run and named in the row
        assert e["ours_matmul_share"] == pytest.approx(e["ours_tflops"] / data["matmul_tflops_measured"],
                                                   abs=0.006 / data["matmul_tflops_measured"] + 0.001)  # 2-decimal TFLOP/s
        assert f"{e['ours_matmul_share']:.0%} of this machine's" in row["what"]
    assert data["machine"]["cpu_bf16"] == (data["machine"]["cpu_bf16_isa"] is not None)
    # a GPU-only goal on a CPU run: listed as not measured (no value, met None), not silently dropped
    assert summary["encode_long_peak_share"]["met"] is None and summary["encode_long_peak_share"]["value"] == "-"
    assert "not measured (needs a CUDA GPU)" in res.stdout
    assert r["poolings"]["rerun_forward_calls"] == 0
    pk = r["packing"]  # padded vs packed passes over the same mixed-length texts
    assert pk["packed_positions"] == pk["tokens"] < pk["padded_positions"] and pk["min_cosine_last"] > 0.999
    assert summary["packing_speedup"]["value"] == pk["speedup"]
    lv = r["levers"]  # 2 blocks x 5 poolings x 2 spans = 20 jobs: the first job's pass pools every block
    assert (lv["blocks"], lv["jobs"]) == (2, 20) and lv["sweep_forward_calls"] == 2  # 12 texts, batches of 8
    assert lv["ensemble_forward_calls"] == 0 and summary["levers_sweep_cost"]["value"] == lv["cost_ratio"]
    assert r["generate"]["identical_outputs"] == r["generate"]["texts"]  # greedy: batching changes nothing
    assert r["train"]["ours"]["negatives_per_loss"] == 6 and r["train"]["paper"]["negatives_per_loss"] == 3
    m = r["memory"]
    # resident memory of a process holding torch and a model: more than 0.1 GiB; the peak is at least the
    # start; a tiny model and 40 short texts stay far below 4 GiB (a unit or sampling error would not)
    assert m["texts"] == 40 and 0.1 < m["rss_after_load_gib"] <= m["peak_rss_gib"] < 4
    assert summary["memory_10k_gib"]["value"] == m["peak_rss_gib"]
    assert summary["memory_10k_gib"]["met"] == (m["peak_rss_gib"] < 2)
    assert [x["texts"] for x in r["scaling"]["by_texts"]] == [8, 16]
    for d in (0.05, 0.0):  # the plain loop and the Trainer stepped on the same token ids
        plain, ours = r["step"][f"plain_{d}"], r["step"][f"ours_{d}"]
        assert plain["tokens_per_step"] == ours["tokens_per_step"] > 4 * 2
        assert 0.1 < plain["peak_rss_gib"] < 4 and 0.1 < ours["peak_rss_gib"] < 4
    rows = [x for x in data["summary"] if x["key"] == "step_speed_vs_plain"]
    assert [x["value"] for x in rows] == [round(r["step"][f"plain_{d}"]["s_per_step"] / r["step"][f"ours_{d}"]["s_per_step"], 2)
                                          for d in (0.05, 0.0)]
    rc = r["recipe"]  # the recipe's step: fused vs auto kernel vs auto at lora_depth 0.5, same token ids
    assert rc["fused"]["tokens_per_step"] == rc["auto"]["tokens_per_step"] == rc["plain"]["tokens_per_step"]
    assert (rc["fused"]["attention"], rc["auto"]["attention"], rc["auto_depth0.5"]["lora_depth"]) == ("fused", "auto", 0.5)
    assert summary["recipe_step_kernel"]["value"] == round(rc["fused"]["s_per_step"] / rc["auto"]["s_per_step"], 2)
    assert summary["recipe_step_depth"]["value"] == round(rc["fused"]["s_per_step"] / rc["auto_depth0.5"]["s_per_step"], 2)
    assert {"encode_short_speedup", "poolings_cost", "rerun_forward_calls", "train_speedup", "train_memory_ratio",
            "generate_speedup", "memory_10k_gib", "scaling_linearity", "levers_sweep_cost",
            "ensemble_forward_calls", "step_speed_vs_plain", "step_memory_vs_plain", "recipe_step_kernel",
            "recipe_step_depth", "recipe_step_vs_plain"} <= set(summary)
    assert "| what | baseline | embedkit |" in res.stdout
