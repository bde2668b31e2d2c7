"""One default per setting: the YAML that documents a section holds the same values as the dataclass
that defines it, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import asdict

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from embedkit.embed import MODES, EncodeConfig
from embedkit.embed.models import default_model_cache


def config(*overrides: str):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_encode_block_is_the_encode_config_defaults():
    assert OmegaConf.to_container(config().encode) == asdict(EncodeConfig())


def test_every_pooling_mode_has_its_config_option_and_nothing_else():
    from pathlib import Path

    import embedkit.conf

    options = {p.stem for p in (Path(embedkit.conf.__path__[0]) / "pooling").glob("*.yaml")}
    assert options == set(MODES)
    for mode in MODES:
        assert config(f"pooling={mode}").pooling.mode == mode


def test_the_model_cache_rule_is_the_same_in_conf_and_code(monkeypatch, tmp_path):
    for env in ({"EMBEDKIT_MODEL_CACHE": str(tmp_path / "m")}, {"XDG_CACHE_HOME": str(tmp_path / "x")}, {}):
        for var in ("EMBEDKIT_MODEL_CACHE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        assert config().paths.model_cache == default_model_cache()


def test_pair_cache_and_checkpoints_are_paths_below_the_output_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDKIT_OUTPUTS", str(tmp_path))
    paths = config().paths
    assert (paths.pair_cache, paths.checkpoints) == (f"{tmp_path}/cache/pairs", f"{tmp_path}/checkpoints")
