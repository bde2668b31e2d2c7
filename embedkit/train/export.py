"""Export a (fine-tuned) embedkit model as a sentence-transformers folder.

``SentenceTransformer(folder).encode(texts)`` then gives the embeddings embedkit computes, with no
embedkit code at load time: the LoRA adapter is merged into the weights, the prompt template (prefix,
suffix, and the EOS for ``eos`` pooling) is baked into the tokenizer's post-processor as fixed token ids,
so truncation cuts only the text, exactly as ``embedkit.embed.tokenize`` does, and the pooling is
sentence-transformers' own ``Pooling`` module (``mean``, ``lasttoken``, ``weightedmean``; plus
``Normalize`` when ``pooling.normalize``). Left padding is kept. ``concat`` has no sentence-transformers
equivalent and is refused. Positions: sentence-transformers passes no position ids, so left-padded rows
start at a later position; with rotary position embeddings (Llama, Qwen, SmolLM2, ...) attention depends
only on relative positions and the embeddings agree to float precision.

The folder also holds ``README.md``, a model card (``embedkit.train.model_card``; with a run's results: its
scores before and after fine-tuning and its training settings), ``embedkit.json`` (the export's settings) and,
in ``config_sentence_transformers.json``, the prompt template under ``"embedkit"`` for information, with
``prompts`` left empty: sentence-transformers prepends its ``prompts`` as strings, which would apply the
baked-in prompt a second time.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_dir
from embedkit.embed.models import Backbone
from embedkit.embed.pooling import Pooling
from embedkit.embed.prompts import Prompt, special_prefix
from embedkit.train.model_card import render_model_card

_ST_POOLING = {"mean": "mean", "last": "lasttoken", "eos": "lasttoken", "weighted_mean": "weightedmean"}


def prompt_post_processor(tokenizer, prompt: Prompt, append_eos: bool):
    """A ``TemplateProcessing`` that wraps the text's tokens in the prompt's fixed token ids."""
    from tokenizers.processors import TemplateProcessing

    head = special_prefix(tokenizer)
    head += tokenizer(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else []
    tail = tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"] if prompt.suffix else []
    tail += [tokenizer.eos_token_id] if append_eos else []
    names = [f"<embedkit_prompt_{i}>" for i in range(len(head) + len(tail))]
    single = " ".join([*names[:len(head)], "$A", *names[len(head):]])
    return TemplateProcessing(single=single, special_tokens=list(zip(names, head + tail))), len(head) + len(tail)


def check_exportable(prompt, pooling: Pooling) -> None:
    """Raise ``EmbedkitError`` naming the lever that a plain sentence-transformers folder cannot express (it
    runs the model's last hidden state through one prompt and its own pooling modules)."""
    if pooling.mode not in _ST_POOLING:
        raise EmbedkitError(f"train.export=true: pooling '{pooling.mode}' has no sentence-transformers "
                            f"equivalent; export one of {', '.join(_ST_POOLING)}")
    if not pooling.is_default_view:
        raise EmbedkitError(f"train.export=true: pooling.layer={pooling.describe()['layer']} (final_norm="
                            f"{pooling.final_norm}) cannot be expressed in sentence-transformers, which pools the "
                            "last hidden state; export with pooling.layer=-1 or set train.export=false")
    if pooling.span == "text" and pooling.mode in ("mean", "weighted_mean") and getattr(prompt, "template", "") != "{text}":
        raise EmbedkitError("train.export=true: pooling.span=text (pool only the text's tokens) cannot be expressed "
                            "with the prompt baked into the tokenizer; export with pooling.span=all")
    if not isinstance(prompt, Prompt):
        raise EmbedkitError(f"train.export=true: prompt '{prompt.name}' is an ensemble; sentence-transformers runs "
                            "one prompt per text")
    if prompt.copies > 1:
        raise EmbedkitError(f"train.export=true: prompt '{prompt.name}' repeats the text (echo); "
                            "sentence-transformers' tokenizer template holds it once")


def export_sentence_transformers(backbone: Backbone, prompt: Prompt, pooling: Pooling, max_length: int,
                                 folder: str | os.PathLike, results: dict | None = None, command: dict | None = None,
                                 model_id: str | None = None) -> Path:
    """Write a sentence-transformers model folder (atomically: complete or absent), with its model card.

    ``results``: the run's ``results.json`` fields, for the card's scores and training details (None: the
    card describes the model only); ``command``: ``model_card.run_command()``; ``model_id``: the Hub repo
    id the folder will be pushed to (the card's usage snippet loads it; default: the folder)."""
    if pooling.mode not in _ST_POOLING:
        raise EmbedkitError(f"pooling '{pooling.mode}' cannot be exported to sentence-transformers; "
                            f"export one of {', '.join(_ST_POOLING)}")
    check_exportable(prompt, pooling)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling as STPooling, Transformer

    with tempfile.TemporaryDirectory(prefix=".embedkit-export-") as hf, atomic_dir(folder) as out:
        hf = Path(hf)
        model = backbone.model
        if hasattr(model, "merge_and_unload"):  # peft: fold the adapter into the weights
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(hf)
        tokenizer = copy.deepcopy(backbone.tokenizer)
        processor, n_added = prompt_post_processor(tokenizer, prompt, append_eos=pooling.mode == "eos")
        tokenizer.backend_tokenizer.post_processor = processor
        tokenizer.padding_side = "left"
        tokenizer.chat_template = None  # else sentence-transformers wraps texts in the chat template
        tokenizer.save_pretrained(hf)
        transformer = Transformer(str(hf), max_seq_length=max_length + n_added, processor_kwargs={"padding_side": "left"})
        modules = [transformer, STPooling(transformer.get_embedding_dimension(), pooling_mode=_ST_POOLING[pooling.mode])]
        if pooling.normalize:
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, similarity_fn_name="cosine", device="cpu")
        st.save(str(out), create_model_card=False)  # the card is written below, with the run's figures
        info = {"base_model": backbone.name, "source": backbone.source, "adapter": backbone.adapter,
                "prompt": prompt.template, "pooling": pooling.mode, "normalize": pooling.normalize,
                "max_length": max_length, "prompt_tokens": n_added}
        (out / "embedkit.json").write_text(json.dumps(info, indent=2))
        st_config = json.loads((out / "config_sentence_transformers.json").read_text(encoding="utf-8"))
        st_config["embedkit"] = {"prompt_template": prompt.template, "prompt_name": prompt.name,
                                 "applied_by": "tokenizer post-processor (fixed token ids)",
                                 "note": "for information only: do not pass it as a prompt, it is already applied"}
        (out / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2), encoding="utf-8")
        card = render_model_card(st, info, results, command, model_id or str(Path(folder).resolve()))
        (out / "README.md").write_text(card, encoding="utf-8")  # atomic with the folder (``atomic_dir``)
    return Path(folder)
