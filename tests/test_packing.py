"""Padding-free (packed) passes: the same pooled embeddings as padded ones for every key, layer view and span,
fewer token positions, no attention across the packed texts, the model's own attention restored, and a clear
message for a bad ``encode.packing``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from embedkit.embed.encoder import EncodeConfig, Encoder, collate
from embedkit.embed.packing import (PACKED_ATTENTION, check_packing, pack, packed_attention,
                                    packed_attention_forward, resolve_packing)
from embedkit.embed.pooling import POOLED_KEYS, default_view, view_key
from embedkit.embed.prompts import Prompt
from embedkit.embed.states import num_blocks, pooled_views, text_mask
from embedkit.errors import EmbedkitError

EOL = Prompt("eol", 'This sentence: "{text}" means in one word:')
LONG = ("A fully differential calculation in perturbative quantum chromodynamics is presented for the production of "
        "massive photon pairs at hadron colliders. All next-to-leading order perturbative contributions from "
        "quark-antiquark, gluon-(anti)quark, and gluon-gluon subprocesses are included, as well as all-orders "
        "resummation of initial-state gluon radiation valid at next-to-next-to-leading logarithmic accuracy.")
TEXTS = ["x", LONG, "Open a file and return a stream.", "hi", LONG[:120], "Deprecated alias."]


def _batch(backbone, texts):
    enc = Encoder(backbone, EOL, max_length=96, show_progress=False, packing="false")
    items = enc.tokenize(texts)
    seqs = [t.ids for t in items]
    ids, mask = collate(seqs, backbone.tokenizer.pad_token_id, backbone.device)
    tmask = text_mask([t.text_span for t in items], [len(s) for s in seqs], ids.shape[1], backbone.device)
    return ids, mask, tmask


def _views(backbone):
    n = num_blocks(backbone.model)
    return [default_view(n), view_key(n // 2, False), view_key(n // 2, True)]


@torch.inference_mode()
def test_packed_pass_matches_the_padded_pass_for_every_key_view_and_span(backbone):
    ids, mask, tmask = _batch(backbone, TEXTS)
    views = _views(backbone)
    padded = pooled_views(backbone.model, ids, mask, views, tmask)
    packed = pooled_views(backbone.model, ids, mask, views, tmask, packed=True)
    assert backbone.model.config._attn_implementation == "sdpa"  # restored after the pass
    for v in views:
        assert set(packed[v]) == set(POOLED_KEYS)
        for k in POOLED_KEYS:
            a, b = padded[v][k].numpy(), packed[v][k].numpy()
            np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, np.abs(a).max()), rtol=0, err_msg=f"{v} {k}")
            cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            assert cos.min() > 0.99999, (v, k, cos.min())


@torch.inference_mode()
def test_a_packed_text_does_not_see_the_texts_packed_with_it(backbone):
    view = [default_view(num_blocks(backbone.model))]
    target = "Return the absolute value of a number."
    ids, mask, tmask = _batch(backbone, [target])
    alone = pooled_views(backbone.model, ids, mask, view, tmask, packed=True)[view[0]]
    for company in (["hi", LONG], [LONG, LONG[:50], "a b c"], [target, "x"]):
        ids, mask, tmask = _batch(backbone, [*company, target])
        mixed = pooled_views(backbone.model, ids, mask, view, tmask, packed=True)[view[0]]
        for k in POOLED_KEYS:
            np.testing.assert_allclose(mixed[k][-1].numpy(), alone[k][0].numpy(), atol=1e-4, rtol=0, err_msg=k)


def test_the_encoder_packs_with_fewer_positions_and_the_same_embeddings(backbone):
    padded = Encoder(backbone, EOL, max_length=96, batch_size=8, show_progress=False, packing="false")
    packed = Encoder(backbone, EOL, max_length=96, batch_size=8, show_progress=False, packing="true")
    a, b = padded.encode_all(TEXTS), packed.encode_all(TEXTS)
    real = sum(len(t.ids) for t in packed.tokenize(TEXTS))
    assert packed.positions == real < padded.positions
    assert packed.forward_calls == padded.forward_calls == 1
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-4 * np.abs(a[k]).max(), rtol=0, err_msg=k)


def test_attention_is_restored_when_a_pass_stops_early_or_fails(backbone):
    ids, mask, tmask = _batch(backbone, TEXTS[:3])
    with torch.inference_mode():  # a layer-0 view ends the pass after block 0 (an exception inside the pass)
        pooled_views(backbone.model, ids, mask, [view_key(0, False)], tmask, packed=True)
    assert backbone.model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with packed_attention(backbone.model):
            assert backbone.model.config._attn_implementation == PACKED_ATTENTION
            raise RuntimeError("boom")
    assert backbone.model.config._attn_implementation == "sdpa"


def test_segment_attention_handles_gqa_equal_lengths_and_scaling():
    """The CPU kernel against plain SDPA per sequence with repeated key/value heads."""
    torch.manual_seed(0)
    lengths = [5, 5, 5, 3, 1, 1, 8, 5]  # runs of equal lengths: one batched call each
    n, heads, kv, d = sum(lengths), 6, 2, 16
    q, k, v = torch.randn(1, heads, n, d), torch.randn(1, kv, n, d), torch.randn(1, kv, n, d)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    module = torch.nn.Module()
    out, weights = packed_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                            max_length_q=max(lengths), max_length_k=max(lengths))
    assert weights is None and out.shape == (1, n, heads, d)
    rep = heads // kv
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e].repeat_interleave(rep, 1), v[:, :, s:e].repeat_interleave(rep, 1),
            is_causal=True, scale=0.3)
        torch.testing.assert_close(out[:, s:e], ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # without cu_seq_lens the sequences are found from the restarts of the position ids
    positions = torch.cat([torch.arange(x) for x in lengths]).unsqueeze(0)
    again, _ = packed_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=positions)
    torch.testing.assert_close(again, out)


def test_pack_layout():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    mask = (ids != 0).long()
    row = pack(ids, mask)
    assert row.ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]] and row.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert row.cu_seq_lens.tolist() == [0, 2, 6, 7] and row.max_length == 4 and row.tokens == 7
    back = row.unpack(row.ids.unsqueeze(-1).float())[..., 0]
    assert back.tolist() == ids.float().tolist()


def test_packing_values_and_auto():
    assert [check_packing(x) for x in ("auto", "true", "false", True, False, "True")] == \
        ["auto", "true", "false", "true", "false", "true"]
    with pytest.raises(EmbedkitError, match=r"encode.packing='maybe'; choose one of auto, true, false"):
        check_packing("maybe")
    assert resolve_packing("auto", torch.device("cpu"), torch.float32)
    assert not resolve_packing("auto", torch.device("cpu"), torch.float32, compiled=True)
    assert not resolve_packing("auto", torch.device("cuda"), torch.float32)  # per-text SDPA on a GPU: padded
    assert not resolve_packing("false", torch.device("cpu")) and resolve_packing("true", torch.device("cuda"))


def test_a_bad_packing_value_is_a_clear_error(backbone):
    from embedkit.schema import check_section

    with pytest.raises(EmbedkitError, match="encode.packing='maybe'; choose one of auto, true, false"):
        Encoder(backbone, EOL, packing="maybe")
    with pytest.raises(EmbedkitError, match="encode.packing='maybe': choose one of auto, true, false"):
        check_section("encode", OmegaConf.create({"packing": "maybe"}), EncodeConfig)
    assert check_section("encode", OmegaConf.create({"packing": True}), EncodeConfig).packing in ("True", "true")
