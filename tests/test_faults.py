"""The fault suite (issue 9): bad configs, bad data, interruptions, determinism, resources, hygiene.

Every fault is produced for real (a typo on the command line, a corrupted file, a signal sent to a
running process, an unwritable folder) and the test asserts what the user sees: one message on stderr,
a documented exit code, no traceback, and no partial file left anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EMBEDKIT, run_cli
from embedkit.data import read_jsonl
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_dir, atomic_write, write_json
from embedkit.pairs import load_pairs
from embedkit.schema import precheck

FAST = ["logger=none", "encode.max_length=16", "encode.show_progress=false"]
BIN = Path(sys.executable).parent


def tiny_set(folder: Path, n: int = 30, labels: int = 3, name: str = "tiny.jsonl") -> Path:
    """n short labelled texts (real sentences from ../shared/data would do too; these keep the test tiny)."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = ["the stock market fell sharply today", "the team won the football match",
              "a new vaccine was tested in a trial", "the recipe needs flour and eggs"][:labels]
    rows = [{"text": f"{topics[i % labels]} (report {i})", "label": f"topic{i % labels}"} for i in range(n)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def partial_files(root: Path) -> list[Path]:
    """Temporary files and folders of the atomic writes (io.atomic_write: .<name>.*.tmp; atomic_dir:
    .tmp-<name>-*), the probe of check_writable, and anything else that looks half-written."""
    return [p for p in root.rglob("*") if re.match(r"^\..*\.tmp$|^\.tmp-|^\.write-test$", p.name)]


def assert_one_message(r: subprocess.CompletedProcess, prog: str, code: int, *fragments: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in errors[0], errors[0]


# --- 1. config validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["pooling=meen"], ["pooling=meen: no such option", "concat, eos, last, mean, weighted_mean", "did you mean mean"]),
    (["prompt=eoll"], ["prompt=eoll: no such option", "did you mean eol"]),
    (["encode.max_lenght=64"], ["encode.max_lenght: unknown key", "max_length, batch_size", "did you mean max_length"]),
    (["train=lora", "train.lr=1e-4"], ["train.lr: unknown key", "temperature"]),
    (["optimizer.lr=abc"], ["optimizer.lr='abc': expected a number"]),
    (["encode.batch_size=x"], ["encode.batch_size='x': expected an integer"]),
    (["encode.batch_size=1.5"], ["encode.batch_size=1.5: expected an integer"]),
    (["train=lora", "train.max_steps=-1"], ["train.max_steps=-1 must be >= 1"]),
    (["train=lora", "train.temperature=0"], ["train.temperature=0.0 must be > 0"]),
    (["train=lora", "train.r=abc"], ["train.r='abc': expected an integer"]),
    (["train=lora", "train.dropout=1.5"], ["train.dropout=1.5 must be in [0, 1)"]),
    (["encode.max_length=0"], ["encode.max_length=0: must be >= 1"]),
    (["seed=abc"], ["seed='abc': expected an integer"]),
    (["pooling.normalize=maybe"], ["pooling.normalize='maybe': expected true or false"]),
    (["model.trust_remote_code=yes"], ["model.trust_remote_code='yes': expected true or false"]),
    (["+pooling.foo=1"], ["pooling.foo: unknown setting for embedkit.pooling.Pooling", "name, mode, normalize"]),
    (["data=jsonl"], ["data.root is required but not set"]),
    (["-m", "pooling=mean,meen"], ["pooling=meen: no such option"]),  # a sweep: every value is checked
    (["-m", "encode.max_length=16,0"], ["encode.max_length=0: must be >= 1"]),
    (["-m", "prompt=glob(*)", "encode.max_length=range(0,2)"], ["encode.max_length=0: must be >= 1"]),
    (["-m", "experiment=demo", "pooling=mean,meen"], ["pooling=meen: no such option"]),
    (["pooling=mean,"], ["cannot parse the command line"]),
])
def test_config_errors_name_key_value_and_what_is_allowed(tmp_path, monkeypatch, args, fragments):
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    t0 = time.perf_counter()
    with pytest.raises(EmbedkitError) as e:
        precheck(args)
    assert time.perf_counter() - t0 < 5
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_valid_command_lines_pass_the_precheck(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    for args in (["pooling=mean"], ["-m", "prompt=none,eol", "pooling=mean,last"], ["experiment=demo_train"],
                 ["train=lora_paper", "optimizer.lr=1e-4", "augmentation=mix"], ["data=mteb_clustering_v1"],
                 ["--help"], ["--cfg", "job"]):
        precheck(args)


@pytest.mark.parametrize("args, fragments", [
    (["pooling=meen"], ["pooling=meen: no such option"]),
    (["optimizer.lr=abc"], ["optimizer.lr='abc'"]),
    (["train=lora", "train.max_steps=-1"], ["train.max_steps=-1"]),
])
def test_config_errors_reach_the_user_fast_and_leave_no_run_folder(tmp_path, args, fragments):
    t0 = time.perf_counter()
    r = run_cli(*args, "logger=none", cwd=tmp_path, timeout=60)
    assert time.perf_counter() - t0 < 15  # < 5 s on an idle machine; the CI box is shared
    assert_one_message(r, "embedkit", 2, *fragments)
    assert not (tmp_path / "outputs" / "runs").exists()  # Hydra never got to make a run folder


# --- 2. data validation -----------------------------------------------------------------------------------

def row(text, label):
    return json.dumps({"text": text, "label": label})


@pytest.mark.parametrize("content, message", [
    (row("a b", "x").encode() + b"\n" + b'{"text": "caf\xe9", "label": "y"}\n', r"t\.jsonl:2: not UTF-8 .*at byte 13"),
    ((row("a b", "x") + "\n" + '{"text": "cut off", "lab').encode(), r"t\.jsonl:2: not valid JSON .*file looks truncated"),
    ((row("a b", "x") + "\n" + json.dumps({"txt": "c", "label": "y"}) + "\n").encode(),
     r"t\.jsonl:2: missing field 'text' \(keys: txt, label\)"),
    ((row("a b", "x") + "\n" + row("   ", "y") + "\n").encode(), r"t\.jsonl:2: empty 'text'"),
    ((row("a b", "x") + "\n" + '{"text": "\\ud800", "label": "y"}\n').encode(), r"t\.jsonl:2: .*lone UTF-16 surrogate"),
    ((row("a b", "x") + "\n" + "[" * 100_000 + "\n").encode(), r"t\.jsonl:2: JSON nested too deeply"),
])
def test_corrupt_data_files_name_the_line(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_bytes(content)
    with pytest.raises(EmbedkitError, match=message):
        read_jsonl(tmp_path / "t.jsonl")


def test_duplicates_singleton_labels_and_long_texts_are_counted_and_reported(tmp_path, caplog):
    lines = [row("alpha beta", "x"), row("alpha beta", "x"), row("gamma", "x"), row("gamma", "y"),
             row("delta", "y"), row("solo", "z"), row("word " * 30_000, "y")]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="embedkit.data"):
        texts, labels, notes = read_jsonl(tmp_path / "t.jsonl")
    assert len(texts) == 7  # nothing is dropped, only counted
    assert notes == {"skipped_empty": 0, "duplicate_rows": 1, "conflicting_labels": 1, "singleton_labels": 1,
                     "long_texts": 1}
    log = caplog.text
    assert "1 duplicate rows" in log and "lines 2)" in log and "1 rows repeat an earlier text under another label (lines 4)" in log
    assert "1 label(s) occur on one row only (z)" in log and "longer than 100000 characters (lines 7)" in log


def test_a_1mb_text_is_cut_at_tokenization_not_a_crash(backbone, caplog):
    from embedkit.encoder import Encoder
    from embedkit.pooling import Pooling
    from embedkit.prompts import Prompt

    big = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    enc = Encoder(backbone, Prompt("eol", 'This sentence: "{text}" means in one word:'), max_length=16,
                  batch_size=4, max_tokens=4096, show_progress=False)
    with caplog.at_level(logging.INFO):
        t0 = time.perf_counter()
        vecs = enc.encode([big, "a short text"], Pooling("last", "last"))
    assert time.perf_counter() - t0 < 30 and vecs.shape == (2, 576) and np.isfinite(vecs).all()
    assert "1 of 2 texts cut to 16 tokens" in caplog.text
    (item,) = enc.tokenize([big])
    assert item.truncated and item.text_span[1] - item.text_span[0] == 16


def test_pair_file_faults(tmp_path, caplog):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n" + json.dumps({"anchor": "a", "positive": "b"})
                 + "\n" + json.dumps({"anchor": "c", "positive": "d"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="embedkit.pairs"):
        pairs = load_pairs(str(p))
    assert pairs.describe()["duplicate_pairs"] == 1 and "1 duplicate pairs (lines 2)" in caplog.text
    p.write_text(json.dumps({"anchor": "a", "positive": "b", "negative": 3}) + "\n")
    with pytest.raises(EmbedkitError, match=r"pairs\.jsonl:1: 'negative' must be a non-empty string"):
        load_pairs(str(p))
    p.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n" + '{"anchor": "c", "posi')
    with pytest.raises(EmbedkitError, match=r"pairs\.jsonl:2: not valid JSON .*truncated"):
        load_pairs(str(p))


# --- fuzzing the JSONL readers ----------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
_good_row = st.fixed_dictionaries({"text": st.text(min_size=1, max_size=30), "label": st.sampled_from("abc")})
_near_row = st.dictionaries(st.sampled_from(["text", "label", "anchor", "positive", "negative", "id", "x"]),
                            _json_values, max_size=5)
_line = st.one_of(
    _good_row.map(json.dumps).map(str.encode),
    _near_row.map(lambda d: json.dumps(d).encode()),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),  # arbitrary bytes: bad UTF-8, NUL, lone braces
    _good_row.map(json.dumps).map(lambda s: s[: len(s) // 2].encode()),  # cut in the middle
    st.sampled_from([b"", b"   ", b'{"text": "\\ud83d", "label": "a"}', b"[" * 5000, b"NaN", b'{"text": "a"} {}',
                     b'\xef\xbb\xbf{"text": "bom", "label": "a"}', b'{"text": "a\\u0000b", "label": "a"}']),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, min_size=1, max_size=6), trailing_newline=st.booleans())
def test_fuzzed_jsonl_fails_only_with_file_and_line(lines, trailing_newline):
    """Whatever the bytes, the readers either return rows or raise EmbedkitError naming file:line (or,
    for file-level problems, the file); never another exception type."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.jsonl"
        data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
        path.write_bytes(data)
        file_lines = data.split(b"\n")  # generated bytes may hold line ends of their own
        for read in (lambda: read_jsonl(path), lambda: read_jsonl(path, empty_text="skip"),
                     lambda: load_pairs(str(path))):
            try:
                read()
            except EmbedkitError as e:
                msg = str(e)
                m = re.match(re.escape(str(path)) + r":(\d+): ", msg)
                if m:
                    n = int(m.group(1))
                    assert 1 <= n <= len(file_lines) and file_lines[n - 1].strip(), msg  # a real, non-blank line
                else:  # file-level: an empty pair file, negatives on some rows only
                    assert str(path) in msg and ("is empty" in msg or "on some rows but not others" in msg), msg


# --- 3. interruption --------------------------------------------------------------------------------------

def test_interrupted_writes_leave_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"old": True})

    class Huge:
        def __str__(self):
            raise KeyboardInterrupt  # Ctrl-C in the middle of json.dump

    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"a": list(range(1000)), "b": Huge()})
    assert json.loads(target.read_text()) == {"old": True}
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "weights.bin").write_bytes(b"x" * 1000)
            raise KeyboardInterrupt
    assert not (tmp_path / "adapter").exists()
    assert partial_files(tmp_path) == []


def test_a_full_disk_is_a_message_and_leaves_nothing_partial(tmp_path, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(EmbedkitError, match=r"no space left on the disk while writing .*x\.npz .*re-run"):
        with atomic_write(tmp_path / "x.npz", "wb") as f:
            f.write(b"0" * 10_000)
    with pytest.raises(EmbedkitError, match="no space left"):
        with atomic_dir(tmp_path / "step-1") as d:
            fd = os.open(d / "w", os.O_WRONLY | os.O_CREAT)
            os.fsync(fd)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_a_checkpoint_keeps_only_complete_ones(backbone, tmp_path, monkeypatch,
                                                                      clustering_root):
    """Ctrl-C (what SIGTERM becomes) while the step-4 checkpoint is being written: step 2 stays complete,
    no temporary folder is left, and train.resume continues from step 2."""
    from functools import partial

    import torch

    from embedkit.pooling import Pooling
    from embedkit.prompts import Prompt
    from embedkit.train import Trainer, TrainConfig

    pairs = load_pairs(str(clustering_root.parent / "pairs" / "clinc150_same_intent" / "train.jsonl"), max_rows=16)

    def trainer(resume=False):
        torch.manual_seed(0)
        cfg = TrainConfig(r=2, alpha=4, dropout=0.0, max_length=8, warmup_steps=0, scheduler="constant",
                          precision="fp32", batch_size=4, chunk_size=4, max_steps=4, save_every=2, resume=resume)
        return Trainer(backbone, Prompt("none", "{text}"), Pooling("last", "last"), pairs, cfg,
                       partial(torch.optim.AdamW, lr=1e-3), checkpoint_dir=tmp_path / "ckpt", seed=0,
                       show_progress=False)

    real_save = torch.save

    def interrupted_save(obj, f, *a, **kw):
        if "step-0000004" in str(f) or ".tmp-step-0000004" in str(f):
            real_save(obj, f, *a, **kw)
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        trainer().fit()
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000002"]
    assert partial_files(tmp_path) == []
    t = trainer(resume=True)
    t.fit()
    assert t.step == 4 and (tmp_path / "ckpt" / "step-0000004").is_dir()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished (rc {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_sigterm_during_a_sweep_then_the_same_command_finishes_it(tmp_path):
    """A sweep of two prompts is killed with SIGTERM while job 1 encodes: job 0's results are complete, no
    temporary file exists anywhere, the exit code is 143 with one message. The same command then
    finishes the sweep, and job 0's scores come from the result cache (no model work)."""
    data = tiny_set(tmp_path / "data", n=120, labels=4)
    sweep = tmp_path / "sweep"
    args = [str(EMBEDKIT), "-m", "data=jsonl", f"data.root={data.parent}", "prompt=none,eol", "pooling=mean",
            *FAST, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "EMBEDKIT_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(sweep.glob("0_*/results.json")), proc, 240, "job 0's results.json")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "embedkit: interrupted (SIGTERM)" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert not list(sweep.glob("1_*/results.json"))  # job 1 was cut off before it wrote anything
    first = json.loads(next(sweep.glob("0_*/results.json")).read_text())
    assert partial_files(tmp_path) == []

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    results = {json.loads(p.read_text())["prompt"]: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert set(results) == {"none", "eol"}
    redone = results["none"]
    assert redone["from_cache"]["scores"] == ["tiny"]  # issue 6's per-task result cache: no evaluation
    assert redone["encode"]["forward_calls"] == 0 and redone["scores"] == first["scores"]
    assert partial_files(tmp_path) == []


def test_sigterm_during_pair_generation_resumes_from_the_last_chunk(tmp_path):
    src = tmp_path / "sentences_train.txt"
    src.write_text("".join(f"sentence {i} about a topic with several words in it\n" for i in range(20_000)))
    cache = tmp_path / "cache"
    args = [str(BIN / "embedkit-pairs"), str(src), "-a", "noise", "chunk_size=200", "--cache-dir", str(cache),
            "--no-progress", "-o", str(tmp_path / "pairs.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(cache.glob("noise-*/parts-200/*.json"))) >= 2, proc, 120, "two chunks")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "embedkit-pairs: interrupted (SIGTERM)" in err and "Traceback" not in err
    done = len(list(cache.glob("noise-*/parts-200/*.json")))
    assert 2 <= done < 100 and not (tmp_path / "pairs.jsonl").exists()
    assert partial_files(tmp_path) == []

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming noise-" in again.stderr and f"{done} of 100 chunks already on disk" in again.stderr
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 20_000 and [r["source_id"] for r in rows[:2]] == ["sentences_train.txt:1",
                                                                          "sentences_train.txt:2"]
    # the resumed set equals one generated in one go (noise is seeded per text)
    from embedkit.augment import NoiseAugmenter

    texts = src.read_text().splitlines()
    whole = NoiseAugmenter(chunk_size=200).make_pairs(texts[:1000], tmp_path / "one-go", seed=0, show_progress=False)
    assert [r["positive"] for r in whole] == [r["positive"] for r in rows[:1000]]
    assert partial_files(tmp_path) == []


# --- 4. determinism ---------------------------------------------------------------------------------------

def test_same_config_and_seed_give_the_same_scores_and_pairs(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    from embedkit.augment import NoiseAugmenter
    from embedkit.run import run

    data = tiny_set(tmp_path / "data", n=40, labels=4)
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=["data=jsonl", f"data.root={data.parent}", "model.dtype=float32",
                                           "model.device=cpu", "encode.cache=false", "eval.cache=false",
                                           "eval.n_seeds=2", "seed=7", *FAST])
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    assert a["encode"]["forward_calls"] > 0 and b["encode"]["forward_calls"] > 0  # both really computed
    assert a["scores"].keys() == b["scores"].keys()
    for k in a["scores"]:
        assert abs(a["scores"][k] - b["scores"][k]) <= 1e-6
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["seed"] == 7 and saved["versions"]["torch"] and saved["versions"]["embedkit"]
    assert re.fullmatch(r"[0-9a-f]{40}", saved["git_commit"] or ""), saved["git_commit"]

    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(50)]
    one = NoiseAugmenter(chunk_size=16).make_pairs(texts, tmp_path / "p1", seed=3, show_progress=False)
    two = NoiseAugmenter(chunk_size=7).make_pairs(texts, tmp_path / "p2", seed=3, show_progress=False)
    other = NoiseAugmenter(chunk_size=16).make_pairs(texts, tmp_path / "p3", seed=4, show_progress=False)
    assert [r["positive"] for r in one] == [r["positive"] for r in two]
    assert [r["positive"] for r in one] != [r["positive"] for r in other]


# --- 5. resources -----------------------------------------------------------------------------------------

def test_unwritable_output_folder_and_a_nearly_full_disk_stop_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli("paths.output_root=" + str(blocker / "outputs"), "logger=none", cwd=tmp_path, timeout=60)
    assert_one_message(r, "embedkit", 2, "cannot write to the output folder", "a-file/outputs",
                       "set paths.output_root")
    r = run_cli("paths.min_free_mb=1000000000", "logger=none", cwd=tmp_path, timeout=60)
    assert_one_message(r, "embedkit", 2, "MiB free on the disk of", "paths.min_free_mb=1,000,000,000")
    assert "loading model" not in r.stderr and not (tmp_path / "outputs" / "runs").exists()


# --- 6. security hygiene ----------------------------------------------------------------------------------

def test_remote_code_is_off_unless_configured():
    from hydra import compose, initialize_config_module

    with initialize_config_module("embedkit.conf", version_base="1.3"):
        for model in ("smollm2-135m", "hf", "llama-3.2-1b", "qwen3-0.6b"):
            cfg = compose("config", overrides=[f"model={model}"] + (["model.name_or_path=x"] if model == "hf" else []))
            assert cfg.model.trust_remote_code is False, model
        for method in ("paraphrase", "backtranslation"):
            cfg = compose("config", overrides=[f"augmentation={method}"])
            assert cfg.augmentation.get("trust_remote_code", False) is False


def test_wandb_key_never_reaches_outputs_or_logs(tmp_path):
    secret = f"dummy-secret-{uuid.uuid4().hex}"
    data = tiny_set(tmp_path / "data", n=20, labels=2)
    env = {**os.environ, "WANDB_API_KEY": secret, "EMBEDKIT_OUTPUTS": str(tmp_path / "outputs"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(EMBEDKIT), "data=jsonl", f"data.root={data.parent}", *FAST, "logger=wandb",
                        "logger.mode=offline", "train=none"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "outputs").rglob("*.wandb")), "the offline W&B run was not written"
    assert secret not in r.stdout + r.stderr
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []


def test_paths_are_never_executed(tmp_path):
    canary = tmp_path / "pwned"
    r = run_cli("data=jsonl", f"data.root='$(touch {canary})'", "logger=none", cwd=tmp_path, timeout=60)
    assert_one_message(r, "embedkit", 2, "is not a folder")
    r = run_cli("model=hf", f"model.name_or_path='x; touch {canary} #'", "logger=none", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    r = subprocess.run([str(BIN / "embedkit-pairs"), f"`touch {canary}`.txt", "-a", "noise"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert_one_message(r, "embedkit-pairs", 2, "is not a file")
    assert not canary.exists()
