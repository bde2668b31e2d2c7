"""Cache and checkpoint keys are a promise to the user's disk: a checkpoint written by an earlier version
keeps resuming, and a generated pair set keeps being found, as long as the settings are the same. The
keys below were computed before the package was reorganised into stage packages (commit 1b171d0's
layout); moving code (and so its ``_target_`` strings) must not change them."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedkit.run import checkpoint_key

TEXTS = ["The council met at the town hall.", "Stocks fell after the announcement.", "A cat sat on the mat."]


def config(*overrides: str):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def fixed_paths(monkeypatch):
    monkeypatch.setenv("EMBEDKIT_MODEL_CACHE", "/models")  # the model node holds the cache folder
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", "/outputs")


@pytest.mark.parametrize("overrides, key", [
    (["train=lora"], "f47beada8607"),
    (["train=lora_paper", "pooling=mean", "prompt=cluster", "augmentation=noise", "pairs=jsonl",
      "pairs.path=/data/pairs.jsonl", "optimizer.lr=1e-4", "seed=3"], "8ae74a0112d5"),
    (["train=lora", "model=hf", "model.name_or_path=/models/llama", "augmentation=paraphrase"], "a366e4b7d484"),
])
def test_checkpoint_keys_are_those_of_earlier_versions(overrides, key):
    from embedkit.train import TrainConfig

    cfg = config(*overrides)
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    assert checkpoint_key(cfg, train_cfg) == key


@pytest.mark.parametrize("option, folder", [
    ("noise", "noise-d65ae0a772a7fe6d8883"),
    ("paraphrase", "paraphrase-93fded909d42ea4977dd"),
])
def test_pair_cache_folders_are_those_of_earlier_versions(option, folder):
    from embedkit.augment.store import pair_set_dir

    augmenter = instantiate(config(f"augmentation={option}").augmentation)
    assert pair_set_dir(augmenter, TEXTS, "/cache", seed=0).name == folder
