"""What the attention analysis writes and prints: ``tokens.csv`` (every token of the example texts),
``aggregate_layers.csv``, ``aggregate.csv`` and ``aggregate_texts.csv`` (the data set aggregate), the
per-example rows of ``summary.json``, the summary printed at the end of a run, and what a logger gets
(``log_attention``: with ``logger=wandb`` the charts as images and the rows as tables)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from embedkit.attention.layers import layer_description
from embedkit.attention.measure import TEXT, Aggregate, Example, shares
from embedkit.io import atomic_write
from embedkit.loggers import NullLogger, started


def write_tokens_csv(path: Path, examples: list[list[Example]], layers: list[int]) -> None:
    """``tokens.csv`` at ``path``: one row per (text, variant, layer, position) of ``examples``
    (``examples[i][v]``, as ``run_examples`` returns them), for each selected layer and, with several, their
    mean; returns None."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text_id", "variant", "layer", "position", "token_id", "token", "role", "sink", "weight",
                    "share_of_non_sink"])
        for t, variants in enumerate(examples):
            for ex in variants:
                selected = [(str(layer), ex.rows[layer]) for layer in layers]
                if len(layers) > 1:
                    selected.append((f"mean({','.join(map(str, layers))})", ex.rows[layers].mean(0)))
                for layer, row in selected:
                    rest = row[1:].sum()
                    for pos, (tid, label, role, wgt) in enumerate(zip(ex.ids, ex.labels, ex.roles, row)):
                        w.writerow([t, ex.variant, layer, pos, tid, label, role, int(pos == 0), f"{wgt:.6g}",
                                    "" if pos == 0 or rest == 0 else f"{wgt / rest:.6g}"])


def example_summary(text_id: int, text: str, ex: Example, layers: list[int]) -> dict:
    """The ``summary.json`` entry of text ``text_id`` through one variant: its token count, sink token, and
    sink mass, text share and text mass averaged over ``layers``."""
    st = shares(ex.rows, ex.roles)
    return {
        "text_id": text_id, "text": text, "variant": ex.variant, "n_tokens": len(ex.ids),
        "truncated": ex.truncated, "sink_token": ex.labels[0],
        "sink_mass": float(st.sink[layers].mean()), "text_share": float(st.text[layers].mean()),
        "text_mass": float(ex.rows[layers][:, 1:][:, np.array(ex.roles[1:]) == TEXT].sum(1).mean()),
    }


def write_aggregate_csvs(folder: Path, aggs: list[Aggregate], layers: list[int], texts_by_task: dict) -> list[dict]:
    """``aggregate_layers.csv`` (per task, variant and layer), ``aggregate.csv`` (per task and variant, at the
    selected ``layers``) and ``aggregate_texts.csv`` (per text; ``texts_by_task`` maps task -> its texts) in
    ``folder``. Returns the rows of ``aggregate.csv`` as dicts (for ``summary.json``)."""
    summary = []
    with atomic_write(folder / "aggregate_layers.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "variant", "layer", "n_texts", "text_share", "text_share_sd", "prompt_share",
                    "special_share", "sink_mass", "text_positions"])
        for a in aggs:
            st = a.layer_stats()
            for layer in range(len(st["text_share"])):
                w.writerow([a.task, a.variant, layer, a.n_texts, *(f"{st[k][layer]:.6f}" for k in
                            ("text_share", "text_share_sd", "prompt_share", "special_share", "sink_mass",
                             "text_positions"))])
    with atomic_write(folder / "aggregate.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        cols = ["task", "variant", "layers", "n_texts", "n_truncated", "n_skipped", "text_share",
                "text_share_se", "prompt_share", "special_share", "sink_mass", "text_positions"]
        w.writerow(cols)
        for a in aggs:
            per = np.array([s.text[layers].mean() for s in a.per_text])
            row = {
                "task": a.task, "variant": a.variant, "layers": ",".join(map(str, layers)), "n_texts": a.n_texts,
                "n_truncated": a.n_truncated, "n_skipped": a.n_skipped, "text_share": float(per.mean()),
                "text_share_se": float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0,
                "prompt_share": float(np.mean([s.prompt[layers].mean() for s in a.per_text])),
                "special_share": float(np.mean([s.special[layers].mean() for s in a.per_text])),
                "sink_mass": float(np.mean([s.sink[layers].mean() for s in a.per_text])),
                "text_positions": float(np.mean([s.text_positions for s in a.per_text])),
            }
            w.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.6f}" for c in cols])
            summary.append(row)
    with atomic_write(folder / "aggregate_texts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "variant", "text_index", "text_share", "prompt_share", "sink_mass", "text_positions",
                    "text"])
        for a in aggs:
            texts = texts_by_task[a.task]
            for i, s in zip(a.indices, a.per_text):
                w.writerow([a.task, a.variant, i, f"{s.text[layers].mean():.6f}", f"{s.prompt[layers].mean():.6f}",
                            f"{s.sink[layers].mean():.6f}", f"{s.text_positions:.6f}", texts[i][:200]])
    return summary


def print_summary(summary: dict) -> None:
    """Print the end-of-run lines of ``summary`` (what ``summary.json`` holds) on stdout; returns None."""
    print(f"attention analysis: {summary['model']}, prompt '{summary['prompt']}', "
          f"{layer_description(summary['layers'], summary['n_layers'])}, {summary['heads']} over heads")
    for ex in summary["examples"]:
        print(f"  example {ex['text_id']} [{ex['variant']}]: text share {ex['text_share']:.3f} of non-sink "
              f"(text mass {ex['text_mass']:.3f}, sink {ex['sink_mass']:.3f})")
    for row in summary["aggregate"]:
        print(f"  {row['task']} [{row['variant']}]: text share {row['text_share']:.3f} ± {row['text_share_se']:.3f} "
              f"over {row['n_texts']} texts (uniform would give {row['text_positions']:.3f}; sink "
              f"{row['sink_mass']:.3f})")
    print(f"  written to {summary['out_dir']}: {', '.join(summary['files'])}")


def log_attention(logger: NullLogger, summary: dict, name: str, group: str | None) -> None:
    """Log a finished analysis (``summary`` as ``run_attention`` returns it) as one run of ``logger``
    (job_type ``attention``, in ``summary['out_dir']``, tagged with the model): the example rows and the
    aggregate as tables, timings as summary metrics, and every PNG written (``example_<i>``,
    ``aggregate_layers``) as an image; prints where the run went; returns None."""
    out_dir = Path(summary["out_dir"])
    with started(logger, summary["config"], name, group, "attention", out_dir, [summary["model"]]):
        for key in ("examples", "aggregate"):
            if summary[key]:
                columns = list(summary[key][0])
                logger.table(key, columns, [[row[c] for c in columns] for row in summary[key]])
        logger.summary({"timings": summary["timings"], "n_layers": summary["n_layers"]})
        logger.images({Path(f).stem: out_dir / f for f in summary["files"] if f.endswith(".png")})
    if logger.location:
        print(f"  logged: {logger.location}")
