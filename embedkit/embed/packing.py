"""Padding-free forward passes: a batch's sequences packed into ONE row, attention kept inside each sequence.

``pack`` turns a left-padded batch ``[B, W]`` into a single row ``[1, sum(lengths)]`` with per-sequence
position ids (``0 .. len-1`` for each sequence, so the rotary embeddings are those of the padded pass) and
flash-attention-style ``cu_seq_lens_q/k`` and ``max_length_q/k``, which transformers hands, unchanged, from
the model's forward ``**kwargs`` to the attention function of every layer. ``PackedBatch.unpack`` puts the
states of any layer back into the left-padded ``[B, W, D]`` layout, so ``pooling.pool_all`` (and the
layer hooks of ``states.pooled_views``) work as in the padded pass; padding positions hold zeros.

The attention is transformers' public ``AttentionInterface`` (``PACKED_ATTENTION``, registered once with
``AttentionMaskInterface``) and is switched on only for the duration of a packed pass
(``packed_attention``, via ``PreTrainedModel.set_attn_implementation``, restored afterwards even when the
pass raises), so training and every other user of the same model keep their own implementation (SDPA).

Kernels: on CUDA in float16/bfloat16 ``torch.nn.attention.varlen.varlen_attn`` (flash attention over the
packed row, causal, GQA); elsewhere, or when that kernel is missing or refuses the inputs, torch SDPA per
sequence (``is_causal=True``), a run of sequences of equal length in one call: exact, and no
``T x T`` mask over the whole packed row. For the mask, transformers gets ``None`` when the packed row
has no 2D mask (the attention function finds the sequences itself) and SDPA's own mask otherwise; a call
with a padding mask, or without packed sequences, runs transformers' SDPA function unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedkit.errors import EmbedkitError

log = logging.getLogger(__name__)

PACKED_ATTENTION = "embedkit_packed"  # the name under transformers' AttentionInterface
PACKING_POLICIES = ("auto", "true", "false")

_REGISTERED: list[bool] = []
_VARLEN: dict[str, object] = {}  # "fn": torch's varlen_attn (or None), "failed": the error that turned it off
_RUNS: list = [None, None]  # (cu_seq_lens tensor, its runs of equal lengths): every layer of a pass shares them


def check_packing(value: str) -> str:
    """``value`` as one of ``PACKING_POLICIES`` (a YAML or command-line ``true``/``false``, which may reach here
    as a bool or as OmegaConf's ``"True"``, is accepted too); raises for anything else."""
    value = str(value).lower() if isinstance(value, (bool, str)) else value
    if value not in PACKING_POLICIES:
        raise EmbedkitError(f"encode.packing={value!r}; choose one of {', '.join(PACKING_POLICIES)} (auto: packed "
                            "passes on the CPU and on a GPU in bf16/fp16 with torch's varlen kernel; false: padded "
                            "passes)")
    return value


def resolve_packing(policy: str, device: torch.device, dtype: torch.dtype | None = None,
                    compiled: bool = False) -> bool:
    """Whether passes are packed under ``policy``. ``auto`` packs on the CPU (measured: never slower than a
    length-sorted padded pass, 1.1-2.5x faster on mixed lengths; see conf/config.yaml) and on CUDA where
    torch's varlen flash kernel serves (float16/bfloat16); not with ``compiled`` (encode.compile keeps its
    compiled padded graph), not elsewhere (per-sequence SDPA on a GPU is bound by kernel launches)."""
    policy = check_packing(policy)
    if policy != "auto":
        return policy == "true"
    kind = torch.device(device).type
    if compiled or kind not in ("cpu", "cuda"):
        return False
    return kind == "cpu" or (dtype in (torch.float16, torch.bfloat16) and varlen_available())


def varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn`` (and it has not failed in this process)."""
    if "fn" not in _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        _VARLEN["fn"] = varlen_attn
    return _VARLEN["fn"] is not None and "failed" not in _VARLEN


@dataclass
class PackedBatch:
    """A left-padded batch packed into one row: ``ids`` and ``position_ids`` [1, N], ``cu_seq_lens`` [B+1]
    int32 (sequence starts in the row), ``max_length``, and ``dest`` [N], each packed token's flat index in
    the padded [B, W] layout."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    max_length: int
    dest: torch.Tensor
    rows: int
    width: int

    @property
    def tokens(self) -> int:
        """The token positions the packed pass computes (the real tokens of the batch)."""
        return int(self.ids.shape[1])

    def forward_kwargs(self) -> dict:
        """The base model's forward arguments for this packed row (no 2D mask, no cache)."""
        return {"input_ids": self.ids, "position_ids": self.position_ids, "use_cache": False,
                "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """[1, N, D] states of the packed row -> [B, W, D] left-padded (zeros at the padding)."""
        out = hidden.new_zeros(self.rows * self.width, hidden.shape[-1])
        out[self.dest] = hidden[0]
        return out.view(self.rows, self.width, -1)


def pack(ids: torch.Tensor, mask: torch.Tensor) -> PackedBatch:
    """Pack a left-padded batch (``ids``, ``mask`` [B, W]) into one row (see ``PackedBatch``)."""
    real = mask.bool()
    lengths = real.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=ids.device)
    cu[1:] = lengths.cumsum(0)
    positions = (mask.cumsum(1) - 1)[real]
    return PackedBatch(ids=ids[real].unsqueeze(0), position_ids=positions.unsqueeze(0), cu_seq_lens=cu,
                       max_length=int(lengths.max()), dest=real.view(-1).nonzero().squeeze(1),
                       rows=ids.shape[0], width=ids.shape[1])


def register_packed_attention() -> str:
    """Register ``PACKED_ATTENTION`` with transformers' attention and mask interfaces (once); returns the name."""
    if not _REGISTERED:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
        AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
        _REGISTERED.append(True)
    return PACKED_ATTENTION


@contextlib.contextmanager
def packed_attention(base):
    """Within the block the transformers model ``base`` (``states.base_model`` of a wrapped one) attends with
    ``PACKED_ATTENTION``; its own implementation is restored on exit."""
    before = base.config._attn_implementation
    if before == PACKED_ATTENTION:
        yield base
        return
    base.set_attn_implementation(register_packed_attention())
    try:
        yield base
    finally:
        base.set_attn_implementation(before)


def packed_mask(*args, attention_mask=None, **kwargs):
    """The mask function of ``PACKED_ATTENTION``: ``None`` for a row without a 2D mask (the attention function
    keeps the sequences apart), transformers' SDPA mask for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one packed row (query [1, H, N, d], key/value [1, Hkv, N, d]) that never crosses the
    sequences of ``cu_seq_lens_q`` (or, without it, of the restarts of ``position_ids``); returns
    ([1, N, H, d], None) as transformers' SDPA function does. Anything else (a batch of rows, a mask) runs
    transformers' ``sdpa_attention_forward``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and query.shape[0] == 1 and attention_mask is None and kwargs.get("position_ids") is not None:
        starts = (kwargs["position_ids"][0] == 0).nonzero().squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([query.shape[2]])]).to(torch.int32)
    if cu is None or attention_mask is not None or query.shape[0] != 1 or cu.numel() <= 2:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise EmbedkitError(f"encode.packing: this model's attention uses {name}, which packed passes do not "
                                "support; set encode.packing=false")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    max_len = kwargs.get("max_length_q")
    window = kwargs.get("sliding_window")
    if window is not None and (max_len is None or max_len > window):
        raise EmbedkitError(f"encode.packing: a sequence may be longer than the model's sliding window ({window}); "
                            "set encode.packing=false or a shorter encode.max_length")
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0 and max_len is not None:
        out = _varlen(query, key, value, cu, int(max_len), scaling, causal, gqa)
        if out is not None:
            return out, None
    return _segments(query, key, value, cu, dropout, scaling, causal, gqa), None


def _varlen(query, key, value, cu, max_len, scaling, causal, gqa):
    """torch's flash-attention varlen kernel over the packed row, or None where it is missing or fails."""
    if not varlen_available():
        return None
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [N, H, d]
    try:
        out = _VARLEN["fn"](q, k, v, cu, cu, max_len, max_len, scale=scaling,
                            window_size=(-1, 0) if causal else (-1, -1), enable_gqa=gqa)
    except (RuntimeError, ValueError) as e:
        _VARLEN["failed"] = e
        log.warning("packed attention: torch's varlen kernel failed (%s); using SDPA per sequence", str(e)[:200])
        return None
    return out.unsqueeze(0)


def _runs(cu: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, length, count) of each run of consecutive sequences of equal length in ``cu`` (in a
    length-sorted batch, every length is one run); computed once per pass, shared by its layers."""
    if _RUNS[0] is cu:
        return _RUNS[1]
    bounds = cu.tolist()
    runs: list[list[int]] = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        if runs and runs[-1][1] == e - s:
            runs[-1][2] += 1
        else:
            runs.append([s, e - s, 1])
    _RUNS[:] = [cu, [tuple(r) for r in runs]]
    return _RUNS[1]


def _segments(query, key, value, cu, dropout, scaling, causal, gqa):
    """SDPA per sequence of the packed row, a run of sequences of equal length as one batched call (a view of
    the row, no copy); [1, N, H, d]."""
    heads, n, dim = query.shape[1], query.shape[2], value.shape[-1]
    out = query.new_empty(1, n, heads, dim)
    for start, length, count in _runs(cu):
        part = slice(start, start + length * count)
        q, k, v = (t[0, :, part].unflatten(1, (count, length)).transpose(0, 1) for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=causal,
                                           enable_gqa=gqa)  # [count, H, length, d]
        out[0, part] = o.transpose(1, 2).reshape(-1, heads, dim)
    return out
