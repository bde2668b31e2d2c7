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
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EMBEDKIT, run_cli
from embedkit.data.clustering import read_jsonl
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_dir, atomic_write, write_json
from embedkit.data.pairs import load_pairs
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
    (["+pooling.foo=1"], ["pooling.foo: unknown setting for embedkit.embed.Pooling", "name, mode, normalize"]),
    (["data=jsonl"], ["data.root is required but not set"]),
    (["-m", "pooling=mean,meen"], ["pooling=meen: no such option"]),  # a sweep: every value is checked
    (["-m", "encode.max_length=16,0"], ["encode.max_length=0: must be >= 1"]),
    (["-m", "prompt=glob(*)", "encode.max_length=range(0,2)"], ["encode.max_length=0: must be >= 1"]),
    (["-m", "experiment=demo", "pooling=mean,meen"], ["pooling=meen: no such option"]),
    (["pooling=mean,"], ["cannot parse the command line"]),
])
def test_config_errors_name_key_value_and_what_is_allowed(tmp_path, monkeypatch, no_model_loading, args, fragments):
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(EmbedkitError) as e:
        precheck(args)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything loads a model or tokenizer (config checks must come before model work)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model or tokenizer was loaded: {args[:2]}")

    for cls in ("AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse)


STDLIB = "embedkit.data.stdlib_docstrings"


@pytest.mark.parametrize("args, checked", [  # (prompt, pooling, train, augmentation, data, optimizer.lr) per check
    (["pooling=mean"], [("eol", "mean", "none", "none", STDLIB, 5e-5)]),
    (["-m", "prompt=none,eol", "pooling=mean,last"],  # one value at a time, with the first of the other sweep
     [("none", "mean", "none", "none", STDLIB, 5e-5), ("eol", "mean", "none", "none", STDLIB, 5e-5),
      ("none", "last", "none", "none", STDLIB, 5e-5)]),
    (["experiment=demo_train"], [("eol", "last", "lora", "none", STDLIB, 3e-4)]),  # the experiment's deltas
    (["train=lora_paper", "optimizer.lr=1e-4", "augmentation=mix"],
     [("eol", "last", "lora_paper", "paraphrase+noise", STDLIB, 1e-4)]),
    (["data=mteb_clustering_v1"], [("eol", "last", "none", "none", "embedkit.data.mteb_tasks", 5e-5)]),
    (["--help"], []),  # other Hydra flags are left to Hydra: nothing composed here
    (["--cfg", "job"], []),
])
def test_valid_command_lines_pass_the_precheck(tmp_path, monkeypatch, no_model_loading, args, checked):
    """The precheck composes and validates exactly the configurations the command line asks for (a
    sweep one value at a time), accepts them, and probes the output folder they would write to."""
    import embedkit.schema as schema

    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path / "outputs"))
    seen, probed = [], []

    def validate(cfg):
        schema_validate(cfg)  # the real check; it must not raise for these command lines
        seen.append((cfg.prompt.name, cfg.pooling.name, cfg.train.name, cfg.augmentation.name, cfg.data._target_,
                     cfg.optimizer.lr))

    schema_validate = schema.validate
    monkeypatch.setattr(schema, "validate", validate)
    monkeypatch.setattr(schema, "check_writable", lambda folder, min_free_mb=0: probed.append(Path(folder)))
    precheck(args)
    assert seen == checked
    assert probed == ([tmp_path / "outputs"] if checked else [])


@pytest.mark.parametrize("args, fragments", [
    (["pooling=meen"], ["pooling=meen: no such option"]),
    (["optimizer.lr=abc"], ["optimizer.lr='abc'"]),
    (["train=lora", "train.max_steps=-1"], ["train.max_steps=-1"]),
])
def test_config_errors_reach_the_user_before_any_model_work_and_leave_no_run_folder(tmp_path, args, fragments):
    r = run_cli(*args, "logger=none", cwd=tmp_path, timeout=120)  # the timeout only guards against a hang
    assert_one_message(r, "embedkit", 2, *fragments)
    assert "loading model" not in r.stderr + r.stdout
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
    # labels are strings or integers (3.0 counts as 3); str() of anything else would invent a label
    ((row("a b", "x") + "\n" + row("c", ["0"]) + "\n").encode(),
     r"t\.jsonl:2: 'label' must be a string or an integer, got a list \(\[\"0\"\]\)"),
    ((row("a b", "x") + "\n" + row("c", {"name": "y"}) + "\n").encode(), r"t\.jsonl:2: 'label' .* got an object"),
    ((row("a b", "x") + "\n" + row("c", False) + "\n").encode(), r"t\.jsonl:2: 'label' .* got a boolean \(false\)"),
    ((row("a b", "x") + "\n" + row("c", 0.5) + "\n").encode(), r"t\.jsonl:2: 'label' .* got a non-integral number"),
    ((row("a b", "x") + "\n" + '{"text": "c", "label": NaN}\n').encode(), r"t\.jsonl:2: 'label' .* \(NaN\)"),
])
def test_corrupt_data_files_name_the_line(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_bytes(content)
    with pytest.raises(EmbedkitError, match=message):
        read_jsonl(tmp_path / "t.jsonl")


def test_a_list_label_stops_the_cli_with_the_line_before_any_model_work(tmp_path):
    """The reported case: labels ["0"] and ["1"] were read as the label strings '['0']' and '['1']'."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "t.jsonl").write_text(row("a b", "x") + "\n" + row("c d", ["0"]) + "\n" + row("e f", ["1"]) + "\n")
    r = run_cli("data=jsonl", f"data.root={data}", "logger=none", cwd=tmp_path, timeout=300)
    assert_one_message(r, "embedkit", 2, f"{data / 't.jsonl'}:2: 'label' must be a string or an integer, "
                       'got a list (["0"])')
    assert "loading model" not in r.stderr + r.stdout


def test_duplicates_singleton_labels_and_long_texts_are_counted_and_reported(tmp_path, caplog):
    lines = [row("alpha beta", "x"), row("alpha beta", "x"), row("gamma", "x"), row("gamma", "y"),
             row("delta", "y"), row("solo", "z"), row("word " * 30_000, "y")]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="embedkit.data.clustering"):
        texts, labels, notes = read_jsonl(tmp_path / "t.jsonl")
    assert len(texts) == 7  # nothing is dropped, only counted
    assert notes == {"skipped_empty": 0, "duplicate_rows": 1, "conflicting_labels": 1, "singleton_labels": 1,
                     "long_texts": 1}
    log = caplog.text
    assert "1 duplicate rows" in log and "lines 2)" in log and "1 rows repeat an earlier text under another label (lines 4)" in log
    assert "1 label(s) occur on one row only (z)" in log and "longer than 100000 characters (lines 7)" in log


def test_a_1mb_text_is_cut_at_tokenization_not_a_crash(backbone, caplog):
    from embedkit.embed.encoder import Encoder
    from embedkit.embed.pooling import Pooling
    from embedkit.embed.prompts import Prompt

    big = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    enc = Encoder(backbone, Prompt("eol", 'This sentence: "{text}" means in one word:'), max_length=16,
                  batch_size=4, max_tokens=4096, show_progress=False)
    with caplog.at_level(logging.INFO):
        vecs = enc.encode([big, "a short text"], Pooling("last", "last"))
    assert vecs.shape == (2, 576) and np.isfinite(vecs).all()
    assert "1 of 2 texts cut to 16 tokens" in caplog.text
    (item,) = enc.tokenize([big])
    assert item.truncated and item.text_span[1] - item.text_span[0] == 16
    # the 1 MB text is its first 16 tokens: the same embedding as a 1000-character prefix (also cut to 16)
    head = enc.encode([big[:1000]], Pooling("last", "last"))
    np.testing.assert_allclose(vecs[0], head[0], rtol=1e-4, atol=1e-5)


def test_pair_file_faults(tmp_path, caplog):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n" + json.dumps({"anchor": "a", "positive": "b"})
                 + "\n" + json.dumps({"anchor": "c", "positive": "d"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="embedkit.data.pairs"):
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

    from embedkit.embed.pooling import Pooling
    from embedkit.embed.prompts import Prompt
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


# Holding a command at a known point: the interrupt tests run the real entry point (embedkit.commands.embed.main,
# embedkit.commands.pairs.main: what the console scripts call) through this runner, which pauses the process at
# one named step, says so on stderr and waits there until the test's signal ends it. So the signal
# arrives at exactly that step however busy the machine is (no sleeps, no race with the work).
HOLD_RUNNER = """
import sys, threading

step, value, prog, *args = sys.argv[1:]
sys.argv = [prog, *args]


def hold(what):
    print(f"embedkit-test: holding {what}", file=sys.stderr, flush=True)
    threading.Event().wait(600)  # a signal ends the process here; 600 s only guards against a lost signal


if step == "encode":  # the first forward pass of the job with prompt <value>
    from embedkit.embed.encoder import Encoder

    encode_unique = Encoder._encode_unique

    def held_encode(self, texts, views, prompt, desc):
        if prompt.name == value:
            hold(f"the encode of prompt {value}")
        return encode_unique(self, texts, views, prompt, desc)

    Encoder._encode_unique = held_encode
    from embedkit.commands.embed import main
elif step == "chunk":  # the generation of the pair chunk that starts at text <value>
    from embedkit.augment.noise import NoiseAugmenter

    generate_chunk = NoiseAugmenter.generate_chunk

    def held_chunk(self, texts, start, seed, *a, **kw):
        if start == int(value):
            hold(f"the chunk at {start}")
        return generate_chunk(self, texts, start, seed, *a, **kw)

    NoiseAugmenter.generate_chunk = held_chunk
    from embedkit.commands.pairs import main
sys.exit(main())
"""


class Held:
    """A command started through HOLD_RUNNER; ``wait_held`` returns once it is paused at its step."""

    def __init__(self, step: str, value, prog: Path, args: list[str], cwd: Path, env: dict):
        runner = cwd / "hold" / "runner.py"  # its own folder: sys.path[0] of the child
        runner.parent.mkdir()
        runner.write_text(HOLD_RUNNER)
        self.stdout = open(cwd / "held-stdout.txt", "w")
        self.proc = subprocess.Popen([sys.executable, str(runner), step, str(value), str(prog), *args], cwd=cwd,
                                     env=env, stdout=self.stdout, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._event = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("embedkit-test: holding"):
                self._event.set()
        self._event.set()  # end of output: the process ended without reaching its step

    def wait_held(self, guard_s: float = 600) -> None:
        self._event.wait(guard_s)  # the guard only bounds a hung test; the event is the synchronisation
        if not any(ln.startswith("embedkit-test: holding") for ln in self.lines):
            self.proc.kill()
            pytest.fail(f"the command never reached its step (rc {self.proc.poll()}): {''.join(self.lines)[-3000:]}")

    def terminate(self, guard_s: float = 300) -> str:
        """SIGTERM; returns stderr once the process has exited."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(guard_s)
        self._pump.join(guard_s)
        self.stdout.close()
        return "".join(self.lines)


def test_sigterm_during_a_sweep_then_the_same_command_finishes_it(tmp_path):
    """A sweep of two prompts gets SIGTERM while job 1 encodes: job 0's results are complete, no
    temporary file exists anywhere, the exit code is 143 with one message. The same command then
    finishes the sweep, and job 0's scores come from the result cache (no model work)."""
    data = tiny_set(tmp_path / "data", n=120, labels=4)
    sweep = tmp_path / "sweep"
    cli_args = ["-m", "data=jsonl", f"data.root={data.parent}", "prompt=none,eol", "pooling=mean", *FAST,
                f"hydra.sweep.dir={sweep}"]
    args = [str(EMBEDKIT), *cli_args]
    env = {**os.environ, "EMBEDKIT_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    held = Held("encode", "eol", EMBEDKIT, cli_args, tmp_path, env)
    held.wait_held()  # job 1 (prompt eol) is about to run its first forward pass
    err = held.terminate()
    assert held.proc.returncode == 143, err[-3000:]
    assert "embedkit: interrupted (SIGTERM)" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert not list(sweep.glob("1_*/results.json"))  # job 1 was cut off before it wrote anything
    first = json.loads(next(sweep.glob("0_*/results.json")).read_text())
    assert first["prompt"] == "none" and first["encode"]["forward_calls"] > 0
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
    held = Held("chunk", 400, BIN / "embedkit-pairs", args[1:], tmp_path, env)
    held.wait_held()  # chunks 0 and 1 (texts 0-399) are on disk; the third is being generated
    err = held.terminate()
    assert held.proc.returncode == 143, err[-3000:]
    assert "embedkit-pairs: interrupted (SIGTERM)" in err and "Traceback" not in err
    done = len(list(cache.glob("noise-*/parts-200/*.json")))
    assert done == 2 and not (tmp_path / "pairs.jsonl").exists()
    assert partial_files(tmp_path) == []

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming noise-" in again.stderr and f"{done} of 100 chunks already on disk" in again.stderr
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 20_000 and [r["source_id"] for r in rows[:2]] == ["sentences_train.txt:1",
                                                                          "sentences_train.txt:2"]
    # the resumed set equals one generated in one go (noise is seeded per text)
    from embedkit.augment.noise import NoiseAugmenter

    texts = src.read_text().splitlines()
    whole = NoiseAugmenter(chunk_size=200).make_pairs(texts[:1000], tmp_path / "one-go", seed=0, show_progress=False)
    assert [r["positive"] for r in whole] == [r["positive"] for r in rows[:1000]]
    assert partial_files(tmp_path) == []


# --- 4. determinism ---------------------------------------------------------------------------------------

def test_same_config_and_seed_give_the_same_scores_and_pairs(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    from embedkit.augment.noise import NoiseAugmenter
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
