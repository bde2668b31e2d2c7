"""Fine-tuning from unlabelled texts (issue 16): ``pairs=texts`` and the cheap positive sources ``crop``,
``first_rest`` and ``dropout`` (alone and in ``mix``), on real texts from ../shared/data."""

from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from conftest import SHARED_DATA, run_cli
from embedkit.augment import CropAugmenter, DropoutAugmenter, FirstRestAugmenter, check_dropout_views
from embedkit.augment.sources import split_first_sentence
from embedkit.data.pairs import PairSet, load_texts
from embedkit.embed.prompts import Prompt
from embedkit.errors import EmbedkitError
from embedkit.train import TrainConfig, TrainingPlan

ARXIV_P2P = SHARED_DATA / "clustering" / "arxiv" / "p2p.jsonl"      # titles + abstracts (documents)
ARXIV_S2S = SHARED_DATA / "clustering" / "arxiv" / "s2s.jsonl"      # titles (mostly one sentence, short)
NEWS = SHARED_DATA / "pairs" / "twentynewsgroups_subject_body" / "train.jsonl"  # bodies in `positive`
PROMPT = Prompt("eol", 'This sentence: "{text}" means in one word:')


def texts_of(path, field="text", n=300):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[field] for line, _ in zip(f, range(n))]


def config(*overrides):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def words(text):
    return len(text.split())


# ------------------------------------------------------------------------------------------------- crop
def test_crop_gives_two_different_spans_of_the_same_abstract(tmp_path):
    texts = texts_of(ARXIV_P2P)
    aug = instantiate(config("augmentation=crop").augmentation)
    assert isinstance(aug, CropAugmenter) and (aug.min_fraction, aug.max_fraction, aug.min_words) == (0.3, 0.6, 5)
    rows = aug.make_pairs(texts, tmp_path, seed=0, show_progress=False)
    assert len(rows) == len(texts) and aug.last_report.n_kept == len(texts)  # abstracts are long enough
    for r in rows:
        text = texts[int(r["source_id"])]
        n = words(text)
        assert r["anchor"] != r["positive"]
        assert r["anchor"] in text and r["positive"] in text  # exact substrings, the text's own spacing
        for span in (r["anchor"], r["positive"]):
            assert min(max(round(0.3 * n), 5), n - 1) <= words(span) <= min(max(round(0.6 * n), 5), n - 1)
            assert text.split().count(span.split()[0]) >= 1 and span == span.strip()
        assert r["method"] == "crop" and r["settings"]["min_fraction"] == 0.3
    assert len({r["anchor"] for r in rows}) == len(rows)
    again = aug.make_pairs(texts, tmp_path, seed=0, show_progress=False)
    assert again == rows and aug.stats["cache_hits"] == 1  # the pair store: read, not generated again
    other = aug.make_pairs(texts, tmp_path, seed=1, show_progress=False)
    assert sum(a["anchor"] != b["anchor"] for a, b in zip(rows, other)) > 0.9 * len(rows)  # seeded per text


def test_crop_skips_very_short_texts_and_counts_them(tmp_path):
    titles = texts_of(ARXIV_S2S, n=200)
    aug = CropAugmenter(min_words=5)
    rows = aug.make_pairs(titles, tmp_path, show_progress=False)
    short = sum(words(t) < 6 for t in titles)
    assert short > 0 and aug.last_report.dropped == {"too_short": short} and len(rows) == len(titles) - short
    assert all(r["anchor"] != r["positive"] and r["anchor"] in titles[int(r["source_id"])] for r in rows)
    # six words: the only spans are words 1-5 and 2-6, and they must differ
    six = "Spin glasses on random regular graphs"
    for seed in range(20):
        (r,) = CropAugmenter().generate_chunk([six], 0, seed).rows
        assert {r["anchor"], r["positive"]} == {"Spin glasses on random regular", "glasses on random regular graphs"}
    res = CropAugmenter().generate_chunk(["la la la la la la la la", "too short to crop"], 0, 0)
    assert res.rows == [] and res.report.dropped == {"identical": 1, "too_short": 1}
    with pytest.raises(EmbedkitError, match=r"all 2 crop outputs were filtered out.*too_short 2.*min_words \+ 1"):
        CropAugmenter().make_pairs(["Hello world", "A short title here"], tmp_path, show_progress=False)
    with pytest.raises(EmbedkitError, match="min_fraction"):
        CropAugmenter(min_fraction=0.7, max_fraction=0.5)


# ------------------------------------------------------------------------------------------- first_rest
def test_first_rest_pairs_the_first_sentence_with_the_rest_of_a_newsgroup_body(tmp_path):
    bodies = texts_of(NEWS, "positive")
    aug = instantiate(config("augmentation=first_rest").augmentation)
    rows = aug.make_pairs(bodies, tmp_path, show_progress=False)
    report = aug.last_report
    one = [t for t in bodies if split_first_sentence(t) is None]
    assert report.dropped == ({"one_sentence": len(one)} if one else {}) and len(rows) == len(bodies) - len(one)
    assert len(rows) > 0.8 * len(bodies)
    for r in rows:
        text = bodies[int(r["source_id"])].strip()
        assert text.startswith(r["anchor"]) and text.endswith(r["positive"])  # the positive is the rest
        assert re.fullmatch(r"\s+", text[len(r["anchor"]):len(text) - len(r["positive"])])  # nothing in between
        assert re.search(r"[.!?][\"')\]]*$", r["anchor"]) and words(r["anchor"]) >= 3
    # titles are one sentence: skipped and counted
    titles = texts_of(ARXIV_S2S, n=100)
    res = FirstRestAugmenter().generate_chunk(titles, 0, 0)
    assert res.report.dropped["one_sentence"] == sum(split_first_sentence(t) is None for t in titles) > 90


@pytest.mark.parametrize("text, split", [
    ("The cat sat. It was happy.", ("The cat sat.", "It was happy.")),
    ("Hi. This is a short note.", None),                                      # the head runs on: one sentence
    ("Hi all. We met (see e.g. Fig. 2 of Smith et al. 2003) today. Then we left.",
     ("Hi all. We met (see e.g. Fig. 2 of Smith et al. 2003) today.", "Then we left.")),
    ("J. Smith wrote the paper. It is good.", ("J. Smith wrote the paper.", "It is good.")),
    ('He said "stop here!" Then he left.', ('He said "stop here!"', "Then he left.")),
    ("A heading without end mark\n\nThe body follows here.", ("A heading without end mark", "The body follows here.")),
    ("Only one sentence here.", None),
    ("No end mark at all", None),
])
def test_sentence_split(text, split):
    assert split_first_sentence(text) == split


# -------------------------------------------------------------------------------------------------- dropout
def test_dropout_pairs_are_the_text_itself_and_need_model_dropout(backbone, tmp_path):
    texts = texts_of(NEWS, "positive", n=16)
    aug = instantiate(config("augmentation=dropout").augmentation)
    assert isinstance(aug, DropoutAugmenter)
    rows = aug.make_pairs(texts, tmp_path, show_progress=False)
    assert [(r["anchor"], r["positive"]) for r in rows] == [(t, t) for t in texts]
    pairs = PairSet("news+dropout", [r["anchor"] for r in rows], [r["positive"] for r in rows])
    tiny = dict(batch_size=8, max_length=16, r=4, alpha=8)
    with pytest.raises(EmbedkitError, match="every anchor equals its positive .* train.model_dropout=0"):
        TrainingPlan(backbone.tokenizer, PROMPT, pairs, TrainConfig(**tiny, model_dropout=0.0))
    TrainingPlan(backbone.tokenizer, PROMPT, pairs, TrainConfig(**tiny, model_dropout=0.1))  # SimCSE: accepted
    # the config check that runs before any model work names the option
    cfg = config("train=lora", "augmentation=dropout", "train.model_dropout=0")
    with pytest.raises(EmbedkitError, match=r"^augmentation=dropout makes SimCSE pairs.*train.model_dropout=0"):
        check_dropout_views(cfg.augmentation, cfg.pairs, 0.0)
    check_dropout_views(cfg.augmentation, cfg.pairs, 0.1)
    mixed = config("augmentation=mix_cheap", "+augmentation@augmentation.methods.simcse=dropout")
    with pytest.raises(EmbedkitError, match=r"augmentation=crop\+first_rest with a dropout member "
                                            r"\(augmentation.methods.simcse\)"):
        check_dropout_views(mixed.augmentation, mixed.pairs, 0.0)
    texts_none = config("pairs=texts", "pairs.path=x.txt")
    with pytest.raises(EmbedkitError, match="pairs=texts with augmentation=none trains on SimCSE dropout views"):
        check_dropout_views(texts_none.augmentation, texts_none.pairs, 0.0)
    for ok in (config("pairs=texts", "pairs.path=x.txt", "augmentation=crop"), config("augmentation=noise")):
        check_dropout_views(ok.augmentation, ok.pairs, 0.0)


def test_the_command_line_refuses_dropout_views_without_dropout_before_model_work(tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts_of(NEWS, "positive", n=20)) + "\n", encoding="utf-8")
    r = run_cli("train=lora", "pairs=texts", f"pairs.path={src}", "augmentation=dropout", "train.model_dropout=0",
                "logger=none", cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "augmentation=dropout makes SimCSE pairs" in r.stderr and "train.model_dropout>0" in r.stderr
    assert "Traceback" not in r.stderr and "loading model" not in r.stderr + r.stdout


# ------------------------------------------------------------------------------------------------------ mix
def test_mix_combines_the_cheap_sources(tmp_path):
    from embedkit.run import augment_pairs

    bodies = texts_of(NEWS, "positive", n=60)
    cfg = config("augmentation=mix_cheap", "+augmentation@augmentation.methods.simcse=dropout",
                 f"paths.output_root={tmp_path}")
    out = augment_pairs(cfg, PairSet("news", bodies + bodies[:3], bodies + bodies[:3]))  # repeats count once
    n_rest = sum(split_first_sentence(t) is not None for t in bodies)
    assert out.name == "news+crop+first_rest" and len(out) == 2 * len(bodies) + n_rest
    crop = CropAugmenter().make_pairs(bodies, tmp_path / "ref", show_progress=False)
    first = FirstRestAugmenter().make_pairs(bodies, tmp_path / "ref", show_progress=False)
    want = [(r["anchor"], r["positive"]) for r in crop + first] + [(t, t) for t in bodies]  # members by name
    assert list(zip(out.anchors, out.positives)) == want
    split = instantiate(config("augmentation=mix_cheap", "augmentation.mode=split").augmentation)
    rows = split.make_pairs(bodies, tmp_path, show_progress=False)
    assert 0 < sum(r["method"] == "crop" for r in rows) < len(rows) and {r["method"] for r in rows} == {"crop", "first_rest"}


# ------------------------------------------------------------------------------------------------ pairs=texts
def test_pairs_texts_reads_jsonl_and_txt_and_never_reads_labels(tmp_path, monkeypatch):
    import embedkit.data.pairs as pairs_module

    rows = [json.loads(line) for line, _ in zip(open(ARXIV_P2P, encoding="utf-8"), range(50))]
    jsonl = tmp_path / "abstracts.jsonl"
    lines = [json.dumps(r) for r in rows] + ["", json.dumps(rows[0]), json.dumps({"text": "  ", "label": "x"})]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    real_iter = pairs_module.iter_jsonl

    class NoLabels(dict):
        """A row that fails the test if anything but a text field (text, or anchor below) is read."""
        def __getitem__(self, key):
            assert key in ("text", "anchor"), f"read {key!r}"
            return super().__getitem__(key)

        def get(self, key, default=None):
            assert key in ("text", "anchor"), f"read {key!r}"
            return super().get(key, default)

    monkeypatch.setattr(pairs_module, "iter_jsonl", lambda *a, **kw: ((n, NoLabels(r)) for n, r in real_iter(*a, **kw)))
    cfg = config("train=lora", "pairs=texts", f"pairs.path={jsonl}")
    got = instantiate(cfg.pairs)
    texts = [r["text"] for r in rows]
    assert got.anchors == texts and got.positives == texts and got.negatives is None  # blank and duplicate skipped
    assert (got.name, got.source) == ("abstracts", str(jsonl)) and got.describe()["anchor_is_positive"] == 50
    sub = load_texts(str(jsonl), max_rows=10, seed=3)
    assert len(sub) == 10 and sub.anchors == [t for t in texts if t in set(sub.anchors)]  # file order kept
    assert load_texts(str(jsonl), max_rows=10, seed=3).anchors == sub.anchors != load_texts(str(jsonl), max_rows=10).anchors

    txt = tmp_path / "bodies.txt"
    bodies = texts_of(NEWS, "positive", n=30)
    txt.write_text("\n".join(bodies[:15]) + "\n\n   \n" + "\r\n".join(bodies[15:]) + "\r\n", encoding="utf-8")
    got = load_texts(str(txt))
    assert got.anchors == bodies == got.positives
    other = tmp_path / "anchors.jsonl"
    other.write_text("".join(json.dumps({"anchor": t, "positive": "x"}) + "\n" for t in bodies), encoding="utf-8")
    assert load_texts(str(other), text_field="anchor").anchors == bodies
    with pytest.raises(EmbedkitError, match=r"anchors\.jsonl:1: 'text' is missing.*pairs.text_field"):
        load_texts(str(other))
    (tmp_path / "t.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(EmbedkitError, match="pairs.format='auto' for t.csv"):
        load_texts(str(tmp_path / "t.csv"))
    assert load_texts(str(tmp_path / "t.csv"), format="txt").anchors == ["a,b"]
    with pytest.raises(EmbedkitError, match="is not a file"):
        load_texts(str(tmp_path / "missing.txt"))


def test_the_adapt_experiment_is_unlabelled_texts_with_crops_and_a_budget():
    from embedkit.schema import validate

    with pytest.raises(EmbedkitError, match="pairs.path is required"):
        validate(config("experiment=adapt"))
    cfg = config("experiment=adapt", f"pairs.path={NEWS}", "pairs.text_field=positive")
    validate(cfg)
    assert (cfg.train.name, cfg.augmentation.name, cfg.train.max_minutes) == ("lora", "crop", 10)
    assert cfg.train.export  # the recipe exports a sentence-transformers folder
    # README "The adaptation recipe": PromptEOL/last, no dropout (CPU attention keeps its fused kernel), and a
    # schedule that completes inside the budget
    assert (cfg.prompt.name, cfg.pooling.mode, cfg.train.dropout, cfg.train.model_dropout) == ("eol", "last", 0, 0)
    assert (cfg.train.batch_size, cfg.train.chunk_size, cfg.train.max_steps) == (32, 32, 1000)
    assert cfg.train.fit_budget and cfg.train.epochs == 10  # the schedule fitted to the 10 minutes on this machine
    assert len(instantiate(cfg.pairs)) == 6633  # every distinct body of the 6,667 (34 duplicates kept once)
    check_dropout_views(cfg.augmentation, cfg.pairs, cfg.train.model_dropout)
