"""The training-free levers beyond the paper: layer choice, final norm, pooled span, echo templates, prompt
ensembles (MetaEOL), per-task prompts. Hand computations on a left-padded batch against a plain forward
pass with ``output_hidden_states`` (each text alone, no padding), forward-call counts for sweeps, and the
bad inputs."""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pytest
import torch

from conftest import EMBEDKIT, run_cli
from embedkit.embed.encoder import Encoder
from embedkit.embed.pooling import MODES, Pooling
from embedkit.embed.prompts import Prompt, PromptEnsemble, prompt_option, tokenize
from embedkit.embed.states import final_norm
from embedkit.errors import EmbedkitError

EOL = Prompt("eol", 'This sentence: "{text}" means in one word:')
ECHO = Prompt("echo", "Rewrite the sentence: {text}\nRewritten sentence: {text}")
TEXTS = [
    "Re: Best GPU for deep learning?",
    "Stars form in dense molecular clouds when gravity overcomes gas pressure.",
    "hi",
    "The committee postponed the vote on the new budget until next week because several members were absent.",
]


def plain_states(backbone, ids) -> tuple:
    """hidden_states of one unpadded sequence: [embeddings, block 0, ..., block L-1 after the final norm]."""
    with torch.no_grad():
        return backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def close(a, b, what):
    """Views other than the last hidden state are held in float16: compare to its precision."""
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(np.abs(b).max()), err_msg=what)


@pytest.fixture(autouse=True)
def fresh_memo():
    """Each test counts its own forward passes: no embeddings kept in memory by an earlier test."""
    import embedkit.embed.encoder as enc_mod

    enc_mod._MEMO.clear()


@pytest.fixture()
def encoder(backbone, tmp_path):
    return Encoder(backbone, EOL, max_length=64, batch_size=8, show_progress=False, cache_dir=tmp_path)


def test_layer_final_norm_and_span_match_hand_computations_on_a_padded_batch(encoder, backbone):
    n = backbone.model.config.num_hidden_layers
    norm = final_norm(backbone.model)
    cases = [  # (pooling, hidden_states index, apply the final norm by hand)
        (dict(layer=-1), n, False), (dict(layer=0), 1, False), (dict(layer=12), 13, False),
        (dict(layer=-3, final_norm=True), n - 2, True), (dict(layer=-1, final_norm=False), None, False),
    ]
    items = encoder.tokenize(TEXTS)
    got = {}
    for kw, _, _ in cases:
        for mode in ("mean", "last", "eos", "weighted_mean"):
            for span in ("all", "text"):
                got[(str(kw), mode, span)] = encoder.encode(TEXTS, Pooling("p", mode, span=span, **kw))
    # one pass per family, each serving every mode and span: the last hidden state alone (the default
    # pooling costs what it did before levers), then every raw block, then every normed block
    assert encoder.forward_calls == 3
    for i, item in enumerate(items):
        hs = plain_states(backbone, item.ids)
        s, e = item.text_span
        for kw, index, normed in cases:
            if index is None:  # the last block's raw output: the final norm is what hidden_states[-1] adds
                raw = {}
                hook = backbone.model.layers[-1].register_forward_hook(lambda m, a, o: raw.setdefault("h", o))
                with torch.no_grad():
                    backbone.model(input_ids=torch.tensor([item.ids]))
                hook.remove()
                h = (raw["h"][0] if isinstance(raw["h"], tuple) else raw["h"])[0]
                torch.testing.assert_close(norm(h), hs[-1][0])  # what final_norm=auto adds at the last block
            else:
                h = hs[index][0]
                h = norm(h) if normed else h
            h = h.detach().float()
            content, text = h[:-1], h[s:e]
            w = lambda x: torch.arange(1, len(x) + 1, dtype=torch.float32)[:, None]  # noqa: E731
            expected = {("mean", "all"): content.mean(0), ("mean", "text"): text.mean(0),
                        ("weighted_mean", "all"): (w(content) * content).sum(0) / w(content).sum(),
                        ("weighted_mean", "text"): (w(text) * text).sum(0) / w(text).sum(),
                        ("last", "all"): h[-2], ("last", "text"): h[-2], ("eos", "all"): h[-1], ("eos", "text"): h[-1]}
            for (mode, span), vec in expected.items():
                close(got[(str(kw), mode, span)][i], vec.numpy(), f"{kw} {mode} {span} row {i}")


def test_a_list_of_layers_averages_their_pooled_vectors_and_concat_uses_the_span(encoder, backbone):
    avg = encoder.encode(TEXTS, Pooling("p", "mean", layer=[-4, -3, -2, -1], span="text"))
    parts = [encoder.encode(TEXTS, Pooling("p", "mean", layer=k, span="text")) for k in (-4, -3, -2, -1)]
    np.testing.assert_allclose(avg, np.mean(parts, axis=0), rtol=1e-6, atol=1e-6)
    cat = encoder.encode(TEXTS, Pooling("p", "concat", layer=5, span="text"))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    m5, l5 = (encoder.encode(TEXTS, Pooling("p", m, layer=5, span="text")) for m in ("mean", "last"))
    np.testing.assert_allclose(cat, np.concatenate([unit(m5), unit(l5)], 1), rtol=1e-5, atol=1e-6)
    assert encoder.forward_calls == 1


def test_a_layer_sweep_is_one_pass_and_its_views_are_read_from_disk_in_a_new_encoder(backbone, tmp_path):
    import embedkit.embed.encoder as enc_mod

    first = Encoder(backbone, EOL, max_length=32, batch_size=8, show_progress=False, cache_dir=tmp_path)
    vectors = {}
    for layer in range(backbone.model.config.num_hidden_layers):
        for mode in MODES:
            for span in ("all", "text"):
                vectors[(layer, mode, span)] = first.encode(TEXTS, Pooling("p", mode, layer=layer, span=span))
    assert first.forward_calls == 1  # layers=auto: the first non-default layer pools every block
    enc_mod._MEMO.clear()  # a new process: only the files on disk
    again = Encoder(backbone, EOL, max_length=32, batch_size=8, show_progress=False, cache_dir=tmp_path)
    for key in [(0, "mean", "text"), (17, "weighted_mean", "all"), (29, "concat", "text")]:
        np.testing.assert_array_equal(again.encode(TEXTS, Pooling("p", key[1], layer=key[0], span=key[2])),
                                      vectors[key])  # float16 rounding is applied before use: re-runs agree
    assert again.forward_calls == 0 and again.cache_hits == 3
    sizes = sorted(p.stat().st_size for p in tmp_path.rglob("L*.npz"))
    assert len(sizes) == 29 + 1  # raw blocks 0-29 (block 29 raw too); the last hidden state keeps its old file
    requested = Encoder(backbone, Prompt("q", "Q: {text}"), max_length=32, show_progress=False, cache_dir=tmp_path,
                        layers="requested")
    requested.encode(TEXTS, Pooling("p", "mean", layer=3))
    enc_mod.flush_cache_writes()  # cache files are written in the background
    assert len(list(tmp_path.rglob("L*.npz"))) == 30 + 1  # only block 3 for this prompt


def test_echo_tokenizes_every_copy_cut_the_same_way_and_pools_the_last_copy(encoder, backbone):
    tok = backbone.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    text = "one two three four five six seven"
    (item,) = tokenize(tok, ECHO, [text], max_length=3)
    cut = enc(text)[:3]
    head, mid, tail = enc("Rewrite the sentence: "), enc("\nRewritten sentence: "), [tok.eos_token_id]
    assert list(item.ids) == head + cut + mid + cut + tail and item.truncated
    assert item.text_span == (len(head) + 3 + len(mid), len(head) + 3 + len(mid) + 3)
    echo = Encoder(backbone, ECHO, max_length=64, show_progress=False)
    got = echo.encode(TEXTS, Pooling("p", "mean", span="text"))
    for i, it in enumerate(echo.tokenize(TEXTS)):
        s, e = it.text_span
        hs = plain_states(backbone, it.ids)
        np.testing.assert_allclose(got[i], hs[-1][0, s:e].float().mean(0).numpy(), rtol=1e-4, atol=1e-4)
        first_copy = it.ids[len(head):len(head) + (e - s)]
        assert first_copy == it.ids[s:e]  # the same tokens twice; the pooled ones have seen the whole text


def test_ensemble_is_the_mean_of_unit_member_vectors_and_costs_no_pass_when_members_are_cached(backbone, tmp_path):
    members = [EOL, prompt_option("cluster"), prompt_option("sum")]
    single = Encoder(backbone, EOL, max_length=32, show_progress=False, cache_dir=tmp_path)
    vecs = []
    for m in members:
        single.prompt = m
        vecs.append(single.encode(TEXTS, Pooling("p", "last")))
    ens = Encoder(backbone, PromptEnsemble("mine", members), max_length=32, show_progress=False, cache_dir=tmp_path)
    got = ens.encode(TEXTS, Pooling("p", "last"))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(got, np.mean([unit(v) for v in vecs], axis=0), rtol=1e-6, atol=1e-7)
    assert ens.forward_calls == 0 and ens.cache_hits == 3
    metaeol = PromptEnsemble("metaeol", ["metaeol/category", "metaeol/sentiment"])
    assert "categorize the excerpt" in metaeol.members[0].template and metaeol.members[1].name == "metaeol_sentiment"
    with pytest.raises(EmbedkitError, match=r"'nope' is not a prompt option; choose from .*eol.*metaeol/entity"):
        PromptEnsemble("bad", ["eol", "nope"])
    with pytest.raises(EmbedkitError, match="needs members"):
        PromptEnsemble("bad", [])


def test_per_task_templates_pick_by_name_then_glob_and_fall_back(backbone, tmp_path):
    p = Prompt("eol", EOL.template, per_task={"arxiv-titles": "Title: {text}", "arxiv*": "Paper: {text}",
                                            "news?": "News: {text}"})
    assert p.for_task("arxiv-titles").template == "Title: {text}"
    assert p.for_task("arxiv-abstracts").template == "Paper: {text}"
    assert p.for_task("news1").template == "News: {text}" and p.for_task("news12").template == EOL.template
    assert p.unmatched_patterns(["arxiv-titles", "reddit"]) == ["news?"]
    enc = Encoder(backbone, p, max_length=32, show_progress=False)
    plain = Encoder(backbone, Prompt("x", "Paper: {text}"), max_length=32, show_progress=False)
    np.testing.assert_array_equal(enc.encode(TEXTS, Pooling("p", "last"), task="arxiv-abstracts"),
                                  plain.encode(TEXTS, Pooling("p", "last")))
    with pytest.raises(EmbedkitError, match=r"per_task\['x'\].*a template with '\{text\}'"):
        Prompt("eol", EOL.template, per_task={"x": "no placeholder"})


def test_training_pools_the_layer_and_span_of_evaluation_and_lora_stops_at_that_block(backbone):
    from embedkit.train.config import TrainConfig
    from embedkit.train.lora import embed_sequences, make_lora_model

    pooling = Pooling("p", "mean", layer=9, span="text")
    model = make_lora_model(backbone, TrainConfig(name="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                            pooling)
    tuned_blocks = sorted({int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n})
    assert tuned_blocks == list(range(10))  # blocks above 9 cannot change the embedding
    model.eval()
    items = tokenize(backbone.tokenizer, EOL, TEXTS, 64)
    with torch.no_grad():
        train_vecs = embed_sequences(model, [t.ids for t in items], pooling, backbone.tokenizer.pad_token_id,
                                     torch.device("cpu"), None, True, spans=[t.text_span for t in items])
    evaluated = Encoder(backbone, EOL, max_length=64, show_progress=False).encode(TEXTS, pooling)
    close(train_vecs.numpy(), evaluated, "train vs eval")  # LoRA B = 0 at the start: the base model's vectors


def test_bad_lever_inputs_are_refused_before_model_work(tmp_path):
    with pytest.raises(EmbedkitError, match="pooling.layer is empty"):
        Pooling("p", "mean", layer=[])
    with pytest.raises(EmbedkitError, match=r"pooling.span='words'; choose one of all, text"):
        Pooling("p", "mean", span="words")
    with pytest.raises(EmbedkitError, match="the model has 30 blocks, so a layer is in -30..29"):
        Pooling("p", "mean", layer=[0, 30]).views(30)
    common = ["data=stdlib", "data.max_per_label=3", "logger=none", "encode.max_length=16"]
    r = run_cli(*common, "pooling.layer=40", cwd=tmp_path)
    assert r.returncode == 2 and "pooling.layer=40: the model has 30 blocks" in r.stderr, r.stderr[-2000:]
    assert "encoding" not in r.stderr
    r = run_cli(*common, "prompt=ensemble", "prompt.members=[eol,nope]", cwd=tmp_path)
    assert r.returncode == 2 and "'nope' is not a prompt option" in r.stderr and "loading" not in r.stderr.lower()
    r = run_cli(*common, "prompt=metaeol", "train=lora", cwd=tmp_path)
    assert r.returncode == 2 and "is an ensemble of 8 prompts: fine-tuning trains one prompt" in r.stderr
    r = run_cli(*common, "pooling=mean", "pooling.layer=5", "train=lora", "train.export=true", cwd=tmp_path)
    assert r.returncode == 2 and "pooling.layer=5 (final_norm=auto) cannot be expressed in sentence-transformers" in r.stderr


def test_a_cli_layer_sweep_runs_one_pass_records_the_levers_and_reports_them(tmp_path):
    r = run_cli("-m", "data=stdlib", "data.max_per_label=3", "logger=none", "encode.max_length=16", "pooling=mean,last",
                "pooling.layer=3,-1", "prompt=eol", "prompt.per_task={stdlib-s2s:'Docstring: {text}'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 4
    calls = [res["encode"]["forward_calls"] for res in sorted(results, key=lambda x: x["job"])]
    assert calls[0] > 0 and calls[1:] == [0, 0, 0], calls  # job 0 pools every block of both tasks' texts
    specs = {(res["pooling_spec"]["mode"], res["pooling_spec"]["layer"]): res for res in results}
    assert set(specs) == {("mean", 3), ("mean", -1), ("last", 3), ("last", -1)}
    assert specs[("mean", -1)]["pooling_spec"]["layers_resolved"] == [29]
    assert results[0]["prompt_per_task"] == {"stdlib-s2s": "Docstring: {text}", "stdlib-p2p": EOL.template}
    assert len({res["mean"] for res in results}) == 4 and all(0 < res["mean"] <= 1 for res in results)

    rep = subprocess.run([str(EMBEDKIT.parent / "embedkit-report"), str(sweep), "--table", "levers"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (sweep / "table-levers.md").read_text()
    for (mode, layer), res in specs.items():  # section 1: one row per block, a column per pooling
        block = res["pooling_spec"]["layers_resolved"][0]
        row = next(line for line in md.splitlines() if line.startswith(f"| {block} |"))
        assert f"{100 * res['mean']:.1f}" in row, (mode, layer, row)
    assert (sweep / "table-levers.png").stat().st_size > 10_000  # the per-block line plot
    assert "best block" in md and "echo" not in md.lower().split("###")[1]


def test_span_text_with_no_prompt_and_unmatched_per_task_patterns_are_said(caplog, tmp_path):
    from hydra import compose, initialize_config_module

    from embedkit.run import build

    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=["prompt=none", "pooling=mean", "pooling.span=text", "data.max_per_label=3",
                                           "prompt.per_task={Arxiv*:'Paper: {text}'}", f"paths.output_root={tmp_path}",
                                           "logger=none"])
    with caplog.at_level(logging.INFO, logger="embedkit.run"):
        build(cfg)
    assert "'Arxiv*' match(es) none of the tasks stdlib-s2s, stdlib-p2p" in caplog.text
    assert "pooling.span=text with prompt=none" in caplog.text
