import json

import pytest

from embedkit.data import ClusteringSet, load_jsonl_folder, stdlib_docstrings
from embedkit.errors import EmbedkitError


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def row(text, label):
    return json.dumps({"text": text, "label": label})


def test_folder_of_jsonl_files_becomes_one_task_per_file(clustering_root):
    sets = load_jsonl_folder(str(clustering_root), include=["arxiv/*.jsonl", "twentynewsgroups/test.jsonl"])
    assert [s.name for s in sets] == ["arxiv/p2p", "arxiv/s2s", "twentynewsgroups/test"]
    s2s = sets[1]
    assert len(s2s.texts) == 2000 and s2s.n_labels == 18
    assert sets[2].n_labels == 20 and len(sets[2].texts) == 7532


def test_subsample_is_seeded_and_keeps_file_order(clustering_root):
    a = load_jsonl_folder(str(clustering_root), include=["banking77/test.jsonl"], max_rows=300, seed=1)[0]
    b = load_jsonl_folder(str(clustering_root), include=["banking77/test.jsonl"], max_rows=300, seed=1)[0]
    c = load_jsonl_folder(str(clustering_root), include=["banking77/test.jsonl"], max_rows=300, seed=2)[0]
    assert a.texts == b.texts and a.texts != c.texts and len(a.texts) == 300
    full = load_jsonl_folder(str(clustering_root), include=["banking77/test.jsonl"])[0]
    rest = iter(full.texts)
    assert all(t in rest for t in a.texts)  # a subsequence of the file: file order kept


@pytest.mark.parametrize(
    "lines, message",
    [
        ([row("a", "x"), "{not json", row("b", "y")], r"bad\.jsonl:2: not valid JSON"),
        ([row("a", "x"), json.dumps({"label": "y"})], r"bad\.jsonl:2: missing field 'text'"),
        ([row("a", "x"), json.dumps({"text": "b"})], r"bad\.jsonl:2: missing field 'label'"),
        ([row("a", "x"), row("  ", "y")], r"bad\.jsonl:2: empty 'text'.*data\.empty_text=skip"),
        ([row("a", "x"), row("b", "x")], r"bad\.jsonl: 2 rows but 1 distinct label"),
        ([row("a", "x"), "[1, 2]"], r"bad\.jsonl:2: expected a JSON object"),
        ([row("a", "x"), json.dumps({"text": 5, "label": "y"})], r"bad\.jsonl:2: 'text' must be a string"),
        # a label that is not one string or integer would be str()-ed into an invented label
        ([row("a", "x"), row("b", ["0"])], r"bad\.jsonl:2: 'label' must be a string or an integer, got a list \(\[\"0\"\]\)"),
        ([row("a", "x"), row("b", {"id": 1})], r"bad\.jsonl:2: 'label' must be a string or an integer, got an object"),
        ([row("a", "x"), row("b", "y"), row("c", True)], r"bad\.jsonl:3: 'label' must be .* got a boolean \(true\)"),
        ([row("a", "x"), row("b", 1.5)], r"bad\.jsonl:2: 'label' must be .* got a non-integral number \(1\.5\)"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(EmbedkitError, match=message):
        load_jsonl_folder(str(tmp_path))


def test_non_utf8_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(row("a", "x").encode() + b"\n" + b'{"text": "caf\xe9", "label": "y"}\n')
    with pytest.raises(EmbedkitError, match=r"bad\.jsonl:2: not UTF-8"):
        load_jsonl_folder(str(tmp_path))


def test_empty_texts_can_be_skipped_and_are_counted(tmp_path):
    write(tmp_path / "d.jsonl", [row("a", "x"), row("", "x"), row("b", "y"), "", row("c", "y")])
    (s,) = load_jsonl_folder(str(tmp_path), empty_text="skip")
    assert s.texts == ["a", "b", "c"] and s.notes["skipped_empty"] == 1


def test_missing_folder_and_folder_without_jsonl(tmp_path):
    with pytest.raises(EmbedkitError, match="is not a folder"):
        load_jsonl_folder(str(tmp_path / "nope"))
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(EmbedkitError, match="no JSONL files under"):
        load_jsonl_folder(str(tmp_path))


def test_other_field_names(tmp_path):
    write(tmp_path / "d.jsonl", [json.dumps({"sentence": s, "topic": t}) for s, t in
                                 [("a", 1), ("b", 2), ("c", 1)]])
    (s,) = load_jsonl_folder(str(tmp_path), text_field="sentence", label_field="topic")
    assert s.labels == ["1", "2", "1"]


def test_integer_labels_are_text_and_integral_floats_are_integers(tmp_path):
    write(tmp_path / "d.jsonl", [row("a", 1), row("b", 2.0), row("c", "2"), row("d", -3), row("e", "x")])
    (s,) = load_jsonl_folder(str(tmp_path))
    assert s.labels == ["1", "2", "2", "-3", "x"] and s.n_labels == 4  # 2.0, 2 and "2" are one label


def test_stdlib_demo_set_is_real_labelled_text_and_deterministic():
    s2s, p2p = stdlib_docstrings()
    again = stdlib_docstrings()
    assert s2s.texts == again[0].texts and s2s.labels == p2p.labels
    assert s2s.n_labels >= 10 and len(s2s.texts) >= 300
    assert not {"test", "idlelib", "encodings"} & set(s2s.labels)
    assert max(s2s.labels.count(label) for label in set(s2s.labels)) <= 25
    assert sum(len(t) for t in p2p.texts) > 2 * sum(len(t) for t in s2s.texts)
    assert all(t.strip() for t in s2s.texts + p2p.texts)


def test_clustering_set_checks_its_shape():
    with pytest.raises(EmbedkitError, match="2 texts but 1 labels"):
        ClusteringSet("x", ["a", "b"], ["l"])
