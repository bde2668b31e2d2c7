from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from embedkit.errors import EmbedkitError
from embedkit.embed.prompts import Prompt, special_prefix, tokenize

# The templates of the paper (../shared/docs/paper.md), character for character.
PAPER = {
    "none": "{text}",
    "eol": 'This sentence: "{text}" means in one word:',
    "cluster": 'This sentence: "{text}" belongs to the following cluster:',
    "cluster_short": "Cluster the text: {text}",
    "sum": 'This sentence: "{text}" can be summarized as',
    "pcot": 'After thinking step by step, this sentence: "{text}" means in one word:',
    "ke": "The essence of a sentence is often captured by its main subjects and actions, while descriptive "
          "terms provide additional but less central details. With this in mind, this sentence: \"{text}\" "
          "means in one word:",
    "sth": 'This sentence: "{text}" means something',
    "classification": 'This sentence: "{text}" can be classified as:',
    "question": 'Which cluster would you assign the sentence: "{text}" to?',
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_prompt_configs_hold_the_paper_templates(name):
    with initialize_config_module("embedkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"prompt={name}"])
    prompt = instantiate(cfg.prompt)
    assert prompt.name == name and prompt.template == PAPER[name]
    assert prompt.wrap("X") == PAPER[name].replace("{text}", "X")


def test_every_config_group_option_composes_and_instantiates(tmp_path):
    """Each option builds its ``_target_`` class with exactly the values its YAML file gives."""
    conf = Path(__import__("embedkit.conf").conf.__path__[0])
    for group in ("prompt", "pooling", "logger"):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            extra = ["prompt.members=[eol,cluster]"] if (group, option) == ("prompt", "ensemble") else []
            with initialize_config_module("embedkit.conf", version_base="1.3"):
                cfg = compose("config", overrides=[f"{group}={option}", f"paths.output_root={tmp_path}", *extra])
            values = OmegaConf.to_container(cfg[group], resolve=True)
            obj = instantiate(cfg[group])
            assert type(obj) is get_object(values.pop("_target_")), (group, option)
            if group != "logger":
                assert values["name"] == option, (group, option)  # results name the option
            for key, value in values.items():
                got = getattr(obj, key)
                if key == "per_task":  # null in YAML: no per-task templates
                    assert got == (value or {}), option
                    continue
                if key == "members":  # an ensemble's members: prompt options, loaded with their templates
                    assert [m.template for m in got] == [
                        OmegaConf.load(conf / "prompt" / f"{name}.yaml").template for name in value], option
                    continue
                if key == "mode" and value == "auto":  # wandb: offline without WANDB_API_KEY (conftest drops it)
                    value = "offline"
                assert got == (Path(value) if isinstance(got, Path) else value), (group, option, key)
            if group == "logger" and option == "csv":
                assert obj.path == tmp_path / "runs.csv"


@pytest.mark.parametrize("template", ["no placeholder", "{txt}", ""])
def test_template_without_placeholder_is_rejected(template):
    with pytest.raises(EmbedkitError, match=r"must contain '\{text\}' \(found it 0 times\)"):
        Prompt("bad", template)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_text_span_is_exact_and_prompt_survives_truncation(backbone, name):
    tok = backbone.tokenizer
    prompt = Prompt(name, PAPER[name])
    long_text = " ".join(["alpha beta gamma delta"] * 40)  # 160 words, far beyond max_length
    short = 'this sentence means in one word: "cluster"'  # contains the prompt's own words
    items = tokenize(tok, prompt, [long_text, short], max_length=16)
    head = special_prefix(tok) + (tok(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else [])
    tail = (tok(prompt.suffix, add_special_tokens=False)["input_ids"] if prompt.suffix else []) + [tok.eos_token_id]
    for item, text in zip(items, [long_text, short]):
        s, e = item.text_span
        assert list(item.ids[:s]) == head  # prompt prefix intact
        assert list(item.ids[e:]) == tail  # prompt suffix intact, EOS last
        assert list(item.ids[s:e]) == tok(text, add_special_tokens=False)["input_ids"][:16]
    assert items[0].truncated and items[0].text_span[1] - items[0].text_span[0] == 16
    assert not items[1].truncated
    assert tok.decode(items[1].ids[slice(*items[1].text_span)]) == short


def test_empty_text_still_gets_a_token_of_its_own(backbone):
    (item,) = tokenize(backbone.tokenizer, Prompt("none", "{text}"), [""], max_length=8)
    assert item.text_span[1] - item.text_span[0] == 1 and len(item.ids) >= 2
