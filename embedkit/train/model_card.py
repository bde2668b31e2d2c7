"""The model card (``README.md``) of an exported sentence-transformers folder.

What the libraries know, they write: sentence-transformers' ``SentenceTransformerModelCardData`` (the class
of ``model.model_card_data``; a fresh one, registered with the exported model) gives the tags, ``pipeline_tag``,
``library_name``, the usage snippet with the exported model's own similarities, the module architecture,
the maximum sequence length, the output dimension and the library versions; huggingface_hub's
``ModelCardData`` and ``EvalResult`` write the YAML front matter, with the scores as ``model-index``.

The body keeps the section layout of sentence-transformers' own cards (Model Details, Usage, Evaluation,
Training Details) but is written here, not by ``save(..., create_model_card=True)``: that template fills
Evaluation and Training Details from sentence-transformers' Trainer and evaluator callbacks, which embedkit
does not use (its sections would be empty), and it has no place for a prompt baked into the tokenizer.
Everything the body says about a run is read from the run's ``results.json`` fields (``render_model_card``
takes them as a dict), so the card and the results cannot disagree.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from embedkit.train.config import TrainConfig

__all__ = ["hub_model_id", "render_model_card", "run_command"]

_PLACEHOLDER_ID = "sentence_transformers_model_id"  # what sentence-transformers' usage snippet loads
_TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # loss settings named only when not these


def hub_model_id(source: str | None) -> str | None:
    """``source`` when it is a Hugging Face Hub model id (``owner/name``, not a local folder), else None:
    only such an id may stand as ``base_model`` in the front matter (the Hub links and checks it)."""
    if not source or Path(source).expanduser().exists():
        return None
    return source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) else None


def run_command() -> dict:
    """How this process was started: ``argv`` (the command line as typed) and, inside the Hydra app, this
    job's ``overrides`` (for a sweep job: the values of this job, which reproduce it with ``embedkit``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "embedkit"
    launcher = "python -m embedkit.cli" if name in ("cli.py", "embed.py", "__main__.py") else name
    out = {"argv": " ".join([launcher, *map(shlex.quote, sys.argv[1:])])}
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            out["overrides"] = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        pass
    return out


def render_model_card(st, info: dict, results: dict | None = None, command: dict | None = None,
                      model_id: str | None = None) -> str:
    """The card's text: YAML front matter, then Model Details, Usage, Evaluation and Training Details.

    ``st``: the exported ``SentenceTransformer``; ``info``: the export's settings (``embedkit.json``:
    base_model, source, adapter, prompt, pooling, normalize, max_length, prompt_tokens); ``results``: the
    run's ``results.json`` fields (None outside a run: no Evaluation or Training figures); ``command``:
    ``run_command()``; ``model_id``: the Hub repo id (``train.push_to_hub``) or the local folder, which the
    usage snippet loads."""
    from huggingface_hub import EvalResult, ModelCardData

    results = results or {}
    base_id = hub_model_id(info.get("source"))
    name = f"{info['base_model']} as a text-embedding model (embedkit"
    name += f", prompt {results['prompt']}, pooling {info['pooling']})" if results.get("prompt") else ")"
    # fresh card data of the model's own kind (the model's is left as it is); no Hub look-ups: the base model
    # is set here when it is a Hub id
    data = type(st.model_card_data)(local_files_only=True, model_name=name)
    data.register_model(st)
    data.add_tags(["embedkit", "lora", "clustering"] if info.get("adapter") else ["embedkit", "clustering"])
    if base_id:
        data.base_model = base_id
    if model_id and model_id.count("/") == 1 and hub_model_id(model_id):
        data.model_id = model_id
    st_card = data.to_dict()
    scores = results.get("scores") or {}
    front = ModelCardData(
        base_model=base_id, tags=st_card["tags"], library_name=st_card["library_name"],
        pipeline_tag=st_card["pipeline_tag"], model_name=name if scores else None,
        metrics=["v_measure"] if scores else None,
        eval_results=[EvalResult(task_type="clustering", task_name="Clustering", dataset_type=task, dataset_name=task,
                                 metric_type="v_measure", metric_name="V-measure (0-1)", metric_value=score)
                      for task, score in scores.items()] or None)
    usage = st_card["usage_snippet"].replace(_PLACEHOLDER_ID, model_id or "path/to/this/folder")
    if not data.model_id:  # a local folder, not (yet) on the Hub
        usage = usage.replace("# Download from the 🤗 Hub", "# Load this folder")
    parts = [f"---\n{front.to_yaml()}\n---\n", f"# {name}\n", _intro(info, st_card, base_id),
             _model_details(info, st_card, base_id, results), _usage(usage),
             _evaluation(results), _training(results, st_card, command)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _base_text(info: dict, base_id: str | None) -> str:
    if base_id:
        return f"[{base_id}](https://huggingface.co/{base_id})"
    return f"`{info['base_model']}` (loaded from `{info.get('source')}`)"


def _intro(info: dict, st_card: dict, base_id: str | None) -> str:
    how = ("fine-tuned with a contrastive LoRA adapter (merged into the weights) from", ", a pooling and "
           "contrastive training") if info.get("adapter") else ("built from", " and a pooling")
    return (f"This is a [sentence-transformers](https://www.SBERT.net) model {how[0]} {_base_text(info, base_id)} by "
            f"embedkit: a decoder LLM turned into a text-embedding model with a prompt{how[1]}. It maps texts to a "
            f"{st_card['output_dimensionality']}-dimensional dense vector space, for clustering and other "
            "embedding uses.\n")


def _model_details(info: dict, st_card: dict, base_id: str | None, results: dict) -> str:
    norm = " + `Normalize` (unit vectors)" if info.get("normalize") else ""
    lines = ["## Model Details\n", "### Model Description", "- **Model Type:** Sentence Transformer (exported by "
             f"embedkit {_embedkit_version(results)})",
             f"- **Base model:** {_base_text(info, base_id)}" + (f", source `{info['source']}`" if base_id else ""),
             f"- **Prompt template:** `{info['prompt']}` (baked into the tokenizer; see \"Prompt\" below)",
             f"- **Pooling:** `{info['pooling']}` (sentence-transformers `Pooling` module){norm}",
             f"- **Maximum Sequence Length:** {st_card['model_max_length']} tokens ({info['max_length']} text tokens "
             f"+ {info.get('prompt_tokens', '?')} fixed prompt tokens)",
             f"- **Output Dimensionality:** {st_card['output_dimensionality']} dimensions",
             f"- **Similarity Function:** {st_card['similarity_fn_name']}"]
    if info.get("adapter"):
        lines.append(f"- **Adapter:** LoRA, merged into the weights (trained adapter: `{info['adapter']}`)")
    lines += ["", "### Prompt\n",
              f"Every text is embedded inside the template `{info['prompt']}`. The export bakes it into the "
              "tokenizer: its post-processor wraps each text's tokens in the template's fixed token ids, so "
              "`model.encode(texts)` applies it, exactly as embedkit did in training and evaluation, and truncation "
              f"at {info['max_length']} text tokens cuts only the text, never the prompt. Do not add the prompt to "
              "your texts and do not pass `prompt=` or `prompt_name=` to `encode`: it would be applied twice. For "
              "the same reason `config_sentence_transformers.json` keeps its `prompts` empty and "
              "`\"default_prompt_name\": null` (sentence-transformers would prepend a prompt there as a string, "
              "again, and cannot express text after `{text}`); it records the template under the key "
              "`\"embedkit\"` for information only, which sentence-transformers does not read."]
    if results.get("prompt_per_task"):
        lines.append("\nThe evaluation below used per-task templates (`prompt.per_task`); the export carries "
                     "the run's main template.")
    lines += ["", "### Model Sources\n",
              "- **Documentation:** [Sentence Transformers Documentation](https://sbert.net)",
              "- **Exported with:** embedkit (`train.export=true`; `embedkit.json` in this folder holds the "
              "export's settings)", "", "### Full Model Architecture\n", f"```\n{st_card['model_string']}\n```\n"]
    return "\n".join(lines)


def _usage(snippet: str) -> str:
    return ("## Usage\n\n### Direct Usage (Sentence Transformers)\n\nFirst install the Sentence Transformers "
            "library:\n\n```bash\npip install -U sentence-transformers\n```\n\nThen load the model and embed "
            "plain texts (the prompt is added by the tokenizer):\n" + snippet + "\n")


def _evaluation(results: dict) -> str:
    scores, before = results.get("scores") or {}, results.get("scores_before") or {}
    if not scores:
        return ""
    ev, tasks = results.get("eval") or {}, results.get("tasks") or {}
    seeds = ev.get("kmeans_seeds")
    head = ["## Evaluation\n", "### Metrics\n", "#### Clustering (V-measure)\n",
            f"* Tasks: {', '.join(f'`{t}`' for t in scores)}",
            f"* Evaluated with embedkit's `{ev.get('evaluator', '?')}` clustering evaluator: k-means"
            + (f" with {_n(len(seeds), 'seed')} ({', '.join(map(str, seeds))})" if seeds else "")
            + ", V-measure on a 0-1 scale; " + ("the same prompt, pooling and evaluator before and after "
                                                 "fine-tuning.\n" if before else "one evaluation.\n")]
    cols = ["Task", "Texts", "Labels"] + (["Before fine-tuning", "After fine-tuning", "Change"] if before
                                          else ["V-measure"])
    rows = []
    for task, score in scores.items():
        t = tasks.get(task, {})
        row = [f"`{task}`", t.get("n_texts", ""), t.get("n_labels", "")]
        rows.append(row + ([_f(before.get(task)), _f(score), _signed(score, before.get(task))] if before
                           else [_f(score)]))
    mean_after = results.get("mean", sum(scores.values()) / len(scores))
    if before:
        mean_before = results.get("mean_before", sum(before.values()) / len(before))
        rows.append(["**mean**", "", "", _f(mean_before), _f(mean_after), _signed(mean_after, mean_before)])
    else:
        rows.append(["**mean**", "", "", _f(mean_after)])
    return "\n".join(head) + "\n" + _table(cols, rows) + "\n"


def _training(results: dict, st_card: dict, command: dict | None) -> str:
    train, config = results.get("train"), results.get("config") or {}
    lines = ["## Training Details\n"]
    if train:
        tc, pairs = config.get("train", {}), train.get("pairs", {})
        columns = "anchor, positive and negative" if pairs.get("hard_negatives") else "anchor and positive"
        aug = {k: v for k, v in (config.get("augmentation") or {}).items() if k != "_target_"}
        loss = {k: tc.get(k) for k in ("temperature", "symmetric", "margin", "mask_false_negatives")}
        loss.update({k: tc[k] for k in ("partition", "hardness") if tc.get(k, _TRAIN_DEFAULTS[k]) != _TRAIN_DEFAULTS[k]})
        loss.update(negatives=train.get("negatives"), negatives_per_loss=train.get("negatives_per_loss"))
        lines += ["### Training Dataset\n", f"#### {pairs.get('name', '?')}\n",
                  f"* Source: `{pairs.get('source') or (config.get('pairs') or {}).get('path', '?')}`",
                  f"* Size: {pairs.get('n_pairs', 0):,} training pairs; {train.get('pairs_seen', 0):,} pairs seen "
                  f"in {_n(train.get('steps', 0), 'step')}",
                  f"* Columns: {columns}",
                  f"* Augmentation: `{aug.get('name', 'none')}`" + (f" ({json.dumps(aug)})" if aug.get("name") not in
                                                                     (None, "none") else " (the pairs as given)"),
                  "* Loss: InfoNCE over cosine similarities with in-batch negatives "
                  "(`embedkit.train.losses.info_nce`) with these parameters:",
                  "  ```json\n" + "\n".join("  " + ln for ln in json.dumps(loss, indent=4).splitlines()) + "\n  ```",
                  "", "### Training Hyperparameters\n"]
        opt = {k: v for k, v in (config.get("optimizer") or {}).items() if k not in ("_partial_",)}
        hyper = [("steps", f"{train.get('steps')} (planned {train.get('steps_planned')}, stopped by "
                           f"{train.get('stopped_by')})"),
                 *[(k, tc.get(k)) for k in ("batch_size", "chunk_size", "negatives", "max_length", "max_steps",
                                            "epochs", "max_minutes", "scheduler", "warmup_steps", "max_grad_norm",
                                            "precision", "gradient_checkpointing", "model_dropout")],
                 ("lora", f"r={tc.get('r')}, alpha={tc.get('alpha')}, dropout={tc.get('dropout')}, "
                          f"target_modules={list(tc.get('target_modules') or [])}"),
                 ("optimizer", json.dumps(opt)), ("autocast", train.get("autocast")),
                 ("world_size", train.get("world_size")), ("seed", results.get("seed"))]
        lines += [f"- `{k}`: {v}" for k, v in hyper]
        lines += ["", "### Training Logs\n",
                  f"- first loss {_f(train.get('first_loss'))}, final loss {_f(train.get('final_loss'))}",
                  f"- wall time {train.get('wall_s')} s, {train.get('pairs_per_s')} pairs/s"
                  + (f", peak memory {train['peak_memory_gib']} GiB" if train.get("peak_memory_gib") else "")
                  + f", {train.get('false_negatives_masked')} false negatives masked",
                  ""]
    else:
        lines += ["No training run is recorded with this export (it was written outside an `embedkit` run).\n"]
    lines += ["### Framework Versions\n", f"- embedkit: {_embedkit_version(results)}"
              + (f" (git commit `{results['git_commit']}`)" if results.get("git_commit") else "")]
    versions = results.get("versions") or st_card["version"]
    lines += [f"- {k}: {v}" for k, v in versions.items() if k != "embedkit" and v]
    if command:
        lines += ["", "### Reproduce\n", "The run that made this model (same data files, same versions):\n"]
        if "overrides" in command:
            lines.append("```bash\n" + shlex.join(["embedkit", *command["overrides"]]) + "\n```\n")
        lines.append(f"Launched as: `{command['argv']}`")
    return "\n".join(lines) + "\n"


def _embedkit_version(results: dict) -> str:
    version = (results.get("versions") or {}).get("embedkit")
    if version:
        return version
    try:
        return importlib.metadata.version("embedkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _f(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _signed(after, before) -> str:
    return "" if after is None or before is None else f"{after - before:+.4f}"


def _table(cols: list[str], rows: list[list]) -> str:
    align = ["|:" + "-" * max(3, len(cols[0]) - 1)] + ["-" * max(3, len(c) + 1) + ":" for c in cols[1:]]
    out = ["| " + " | ".join(cols) + " |", "".join(align[:1]) + "|" + "|".join(align[1:]) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
