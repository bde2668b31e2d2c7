"""A tokenizer that puts a BOS before every text (as Llama's and Qwen's base tokenizers do).

SmolLM2's GGUF tokenizer adds none, so the BOS paths would otherwise go untested: the special prefix in
tokenization and truncation, mean / weighted-mean pooling over the BOS, the export's fixed prompt ids, and
the attention sink at a real BOS. The test model is the embedded model's own folder with one change: a
``TemplateProcessing`` post-processor that prepends ``<|im_start|>`` (SmolLM2's BOS token, id 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.attention.measure import SPECIAL, TEXT, run_examples, shares
from embedkit.embed.encoder import Encoder
from embedkit.embed.models import load_backbone
from embedkit.embed.prompts import Prompt, special_prefix, tokenize

EOL = Prompt("eol", 'This sentence: "{text}" means in one word:')
TEXTS = ["A cat sat on the mat.", "Stock markets fell sharply after the announcement of new tariffs.", "Hi"]
BOS_ID = 1


@pytest.fixture(scope="module")
def bos_dir(backbone, tmp_path_factory) -> Path:
    """The embedded model's converted folder, linked file by file, with a tokenizer.json that adds a BOS."""
    src = Path(backbone.source)
    assert (src / "tokenizer.json").is_file(), src
    folder = tmp_path_factory.mktemp("bos") / "smollm2-bos"
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (folder / f.name).symlink_to(f)
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [BOS_ID], "tokens": ["<|im_start|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bos(bos_dir):
    return load_backbone(name="smollm2-bos", name_or_path=str(bos_dir), dtype="float32", device="cpu")


def test_the_bos_comes_first_and_truncation_cuts_only_the_text(bos, backbone):
    tok = bos.tokenizer
    assert special_prefix(tok) == [BOS_ID] and special_prefix(backbone.tokenizer) == []
    prefix = tok(EOL.prefix, add_special_tokens=False)["input_ids"]
    suffix = tok(EOL.suffix, add_special_tokens=False)["input_ids"]
    body = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert len(body) > 4
    (full,), (cut,) = tokenize(tok, EOL, TEXTS[1:2], 64), tokenize(tok, EOL, TEXTS[1:2], 4)
    assert full.ids == (BOS_ID, *prefix, *body, *suffix, tok.eos_token_id) and not full.truncated
    assert full.text_span == (1 + len(prefix), 1 + len(prefix) + len(body))
    assert cut.ids == (BOS_ID, *prefix, *body[:4], *suffix, tok.eos_token_id) and cut.truncated
    assert cut.text_span == (1 + len(prefix), 1 + len(prefix) + 4)
    # without the BOS the same text has the same tokens one position earlier
    (plain,) = tokenize(backbone.tokenizer, EOL, TEXTS[1:2], 64)
    assert plain.ids == full.ids[1:] and plain.text_span == (full.text_span[0] - 1, full.text_span[1] - 1)


def test_poolings_include_the_bos_exactly_as_a_hand_computation(bos):
    """Batched (left-padded) encoding equals one unpadded forward per text, pooled by hand: mean and
    weighted mean count the BOS as a real token (weight 1), last and eos read the end."""
    enc = Encoder(bos, EOL, max_length=16, show_progress=False)
    got = enc.encode_all(TEXTS)
    assert enc.forward_calls == 1
    for i, item in enumerate(enc.tokenize(TEXTS)):
        assert item.ids[0] == BOS_ID
        with torch.inference_mode():
            h = bos.model(input_ids=torch.tensor([item.ids])).last_hidden_state[0].double().numpy()
        real = h[:-1]  # every token but the appended EOS, the BOS included
        w = np.arange(1, len(real) + 1, dtype=np.float64)[:, None]
        expected = {"mean": real.mean(0), "weighted_mean": (w * real).sum(0) / w.sum(), "last": h[-2], "eos": h[-1]}
        for mode, vec in expected.items():
            np.testing.assert_allclose(got[mode][i], vec, rtol=1e-4, atol=2e-4, err_msg=f"{mode}, text {i}")
        # the BOS's state is large (an attention sink), so leaving it out would change the mean a lot
        assert np.abs(real[1:].mean(0) - got["mean"][i]).max() > 0.1


def test_export_keeps_the_bos_in_front_of_the_prompt(bos, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedkit.train.export import export_sentence_transformers
    from embedkit.embed.pooling import Pooling

    mean = Pooling("mean", "mean")
    folder = export_sentence_transformers(bos, EOL, mean, max_length=16, folder=tmp_path / "st")
    st = SentenceTransformer(str(folder), device="cpu")
    ids = st.tokenize(TEXTS[:1])["input_ids"][0].tolist()
    assert ids == list(tokenize(bos.tokenizer, EOL, TEXTS[:1], 16, append_eos=False)[0].ids)
    ours = Encoder(bos, EOL, max_length=16, show_progress=False).encode(TEXTS, mean)
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), ours, rtol=1e-3, atol=2e-4)


def test_the_attention_sink_is_the_bos_and_is_kept_out_of_the_shares(bos_dir):
    eager = load_backbone(name="smollm2-bos", name_or_path=str(bos_dir), dtype="float32", device="cpu",
                          attn_implementation="eager")
    prompt = Prompt("cluster", 'Identify the topic or theme of the following text: "{text}". In one word:')
    ((with_bos,),) = run_examples({"base": eager}, prompt, TEXTS[1:2], heads="mean", max_length=64)
    assert with_bos.ids[0] == BOS_ID and with_bos.labels[0] == "<|im_start|>"
    assert with_bos.roles[0] == SPECIAL and with_bos.roles.count(SPECIAL) == 1
    assert with_bos.roles.count(TEXT) == len(eager.tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"])
    np.testing.assert_allclose(with_bos.rows.sum(1), 1, atol=1e-4)
    st = shares(with_bos.rows, with_bos.roles)
    np.testing.assert_allclose(st.sink, with_bos.rows[:, 0], atol=1e-6)
    np.testing.assert_allclose(st.text + st.prompt + st.special, 1, atol=1e-6)  # shares of the non-sink rest
    assert np.all(st.special == 0)  # the only special token is the sink itself
    # position 0 is the sink: on average over layers it holds more of the final token's attention than any
    # other single position (SmolLM2 was not trained with a BOS, so it is a sink by position, not by id)
    assert st.sink.mean() > with_bos.rows[:, 1:].max(1).mean() + 0.05


def test_the_attention_summary_names_the_bos_as_the_sink(bos, bos_dir, tmp_path):
    from hydra import compose, initialize_config_module

    from embedkit.attention import run_attention

    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("attention", overrides=[
            "model=hf", f"model.name_or_path={bos_dir}", "model.name=smollm2-bos", "model.device=cpu",
            "model.dtype=float32", f"attention.texts=['{TEXTS[0]}']", "attention.n_texts=0",
            f"attention.output_dir={tmp_path}"])
    summary = run_attention(cfg, tmp_path)
    assert summary["sink"] == "position 0 (BOS)"
    (ex,) = summary["examples"]
    (item,) = tokenize(bos.tokenizer, Prompt("cluster", cfg.prompt.template), TEXTS[:1], 512, append_eos=False)
    assert ex["sink_token"] == "<|im_start|>" and ex["n_tokens"] == len(item.ids) and item.ids[0] == BOS_ID
