"""The whole attention analysis of one configuration (``conf/attention.yaml``): check the config before any
model work, load the variants with eager attention, measure the example texts and the data set
aggregate, and write the figures, CSVs and ``summary.json``.

Outputs (in ``out_dir``): ``example_<i>.png`` (one panel per variant, side by side) and ``tokens.csv`` for
the example texts; ``aggregate_layers.png``, ``aggregate_layers.csv`` (per task, variant and layer),
``aggregate.csv`` (per task and variant, at the selected layers), ``aggregate_texts.csv`` (per text) and
``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from embedkit.attention.figures import aggregate_figure, example_figure, save_figure
from embedkit.attention.layers import check_layer_spec, parse_layers
from embedkit.attention.measure import HEAD_REDUCTIONS, run_aggregate, run_examples
from embedkit.attention.outputs import example_summary, print_summary, write_aggregate_csvs, write_tokens_csv
from embedkit.attention.variants import load_variants, parse_variants
from embedkit.embed.peer import is_peer_config
from embedkit.embed.prompts import Prompt, special_prefix
from embedkit.errors import EmbedkitError, find_user_error
from embedkit.io import write_json
from embedkit.runtime import seed_everything, versions
from embedkit.io import check_writable


def _as_texts(spec) -> list[str]:
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not all(isinstance(t, str) for t in spec):
        raise EmbedkitError(f"attention.texts must be a list of strings, got {spec!r}")
    empty = [i for i, t in enumerate(spec) if not t.strip()]
    if empty:
        raise EmbedkitError(f"attention.texts: text {empty[0]} is empty; give example sentences")
    return spec


def _instantiate(node):
    """Hydra's instantiate, with our own errors re-raised as they are (not wrapped)."""
    try:
        return instantiate(node)
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise


def run_attention(cfg: DictConfig, out_dir: Path) -> dict:
    """Validate the config, then analyse examples and the data set; returns what summary.json holds.

    Takes the composed ``attention`` config and the folder to write into; input errors raise an
    ``EmbedkitError`` before any model is loaded or file written where they can be found that early."""
    t0 = time.perf_counter()
    a = cfg.attention
    if is_peer_config(cfg.model):
        raise EmbedkitError(f"model={cfg.model.name or cfg.model.name_or_path} is a sentence-transformers peer; the "
                            "attention analysis is for decoder LLMs (where their final token attends): use an LLM "
                            "such as model=smollm2-135m or model=hf")
    seed_everything(cfg.seed)
    prompt = _instantiate(cfg.prompt)
    if not isinstance(prompt, Prompt) or prompt.copies > 1:
        raise EmbedkitError(f"the attention analysis splits one prompt from one copy of the text; prompt="
                            f"{prompt.name} is {'an ensemble' if not isinstance(prompt, Prompt) else 'an echo template'}: "
                            "analyse one member or the one-copy template (e.g. prompt=echo_once)")
    heads = str(a.heads)
    if heads not in HEAD_REDUCTIONS:
        raise EmbedkitError(f"attention.heads must be one of {', '.join(HEAD_REDUCTIONS)}, got {heads!r}")
    check_layer_spec(a.layers)
    texts = _as_texts(a.texts)
    n_texts = int(a.n_texts or 0)
    if n_texts < 0:
        raise EmbedkitError(f"attention.n_texts must be >= 0 (0 = no aggregate), got {n_texts}")
    if not texts and not n_texts:
        raise EmbedkitError("nothing to analyse: attention.texts is empty and attention.n_texts=0")
    max_length = int(a.max_length)
    if max_length < 1:
        raise EmbedkitError(f"attention.max_length must be >= 1, got {max_length}")
    variants = parse_variants(a.variants, cfg.model.get("adapter"))
    sets = []
    if n_texts:
        sets = [s.subsample(n_texts, cfg.seed) for s in _instantiate(cfg.data)]
    check_writable(out_dir)
    model_cfg = cfg.model.copy()
    OmegaConf.set_struct(model_cfg, False)
    model_cfg.adapter = None
    backbones = load_variants(model_cfg, variants, bool(a.get("allow_base_mismatch", False)))
    base = next(iter(backbones.values()))
    model_name = base.name
    n_layers = base.model.config.num_hidden_layers
    n_heads = getattr(base.model.config, "num_attention_heads", None)
    layers = parse_layers(a.layers, n_layers)
    t_load = time.perf_counter()

    files = []
    examples_out = []
    if texts:
        examples = run_examples(backbones, prompt, texts, heads, max_length)
        write_tokens_csv(out_dir / "tokens.csv", examples, layers)
        files.append("tokens.csv")
        for i, (text, per_variant) in enumerate(zip(texts, examples)):
            fig = example_figure(per_variant, model=model_name, prompt=prompt, layers=layers, heads=heads,
                                 n_heads=n_heads, text=text)
            save_figure(fig, out_dir / f"example_{i}.png")
            files.append(f"example_{i}.png")
            examples_out += [example_summary(i, text, ex, layers) for ex in per_variant]
    t_examples = time.perf_counter()

    aggregate = []
    if sets:
        aggs = []
        for s in sets:
            aggs += run_aggregate(backbones, prompt, s.name, s.texts, heads, max_length)
        aggregate = write_aggregate_csvs(out_dir, aggs, layers, {s.name: s.texts for s in sets})
        save_figure(aggregate_figure(aggs, model=model_name, prompt=prompt, layers=layers, heads=heads),
                    out_dir / "aggregate_layers.png")
        files += ["aggregate.csv", "aggregate_layers.csv", "aggregate_texts.csv", "aggregate_layers.png"]

    summary = {
        "model": model_name, "model_source": base.source, "dtype": str(base.dtype).removeprefix("torch."),
        "prompt": prompt.name, "prompt_template": prompt.template,
        "variants": [{"name": v.name, "adapter": v.adapter} for v in variants],
        "layers": layers, "n_layers": n_layers, "heads": heads, "n_heads": n_heads,
        "final_token": "the prompt's last token, no EOS appended (the state behind 'last' pooling)",
        "sink": "position 0 (" + ("BOS" if special_prefix(base.tokenizer) else "first input token: no BOS") + ")",
        "max_length": max_length, "examples": examples_out, "aggregate": aggregate,
        "tasks": {s.name: {"n_texts": len(s.texts), "source": s.source, **s.notes} for s in sets},
        "files": files, "out_dir": str(out_dir),
        "timings": {"load_s": round(t_load - t0, 2), "examples_s": round(t_examples - t_load, 2),
                    "aggregate_s": round(time.perf_counter() - t_examples, 2),
                    "total_s": round(time.perf_counter() - t0, 2)},
        "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "summary.json", summary)
    print_summary(summary)
    return summary
