"""The adaptation table (``embedkit-report DIR --table adapt``, ``make table-adapt``): is the adapted LLM a
better embedder than the small purpose-built one a user would otherwise take?

From the runs of one ``make table-adapt`` folder: untuned LLM runs (a prompt x pooling sweep), fine-tuned
runs of the recipe (``experiment=adapt``, one per seed) and peer runs (``model=minilm``). Per clustering
set and on average it shows the untuned model's best configuration, the recipe before and after tuning
(mean +- sample std over seeds), each peer, the recipe's margin over the best peer, and the training time;
a second section lists every seed (steps made, why it stopped, wall time, mean). Scores are V-measure x 100.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.report.results import fmt_score, is_peer
from embedkit.report.levers import LeverTables

__all__ = ["AdaptTable", "adapt_table"]


@dataclass
class AdaptTable(LeverTables):
    """The adaptation table's sections, plus per set the bars of ``table-adapt.png``: ``bars`` maps a series
    (untuned best, recipe, each peer) to ``{set: (value, std or None)}``."""

    bars: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)

    def line_plot(self, path: Path) -> bool:
        """``table-adapt.png``: grouped bars per set (and the mean), the recipe with its seed std as an error
        bar. Returns whether there was anything to plot (the report's plot hook)."""
        if not self.bars:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sets = list(next(iter(self.bars.values())))
        width = 0.8 / len(self.bars)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(sets)), 3.8))
        for k, (series, values) in enumerate(self.bars.items()):
            xs = [i + (k - (len(self.bars) - 1) / 2) * width for i in range(len(sets))]
            ys = [100 * values.get(s, (float("nan"), None))[0] for s in sets]
            err = [100 * (values.get(s, (0, None))[1] or 0) for s in sets]
            ax.bar(xs, ys, width, yerr=err if any(err) else None, capsize=3, label=series)
        ax.set_xticks(range(len(sets)), [s.replace("/", "/\n") for s in sets], fontsize=8)
        ax.set_ylabel("V-measure x100")
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        plt.close(fig)
        return True


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} +- {100 * statistics.stdev(values):.1f}"


def _label(r: dict) -> str:
    spec = r.get("pooling_spec") or {}
    layer = spec.get("layer", -1)
    return f"{r['prompt']}/{r['pooling']}" + (f"@{layer}" if layer not in (-1, None) else "")


def adapt_table(results: list[dict], refs: dict | None = None) -> LeverTables:
    """The adaptation table from untuned, recipe (fine-tuned) and peer runs (see the module doc)."""
    tuned = [r for r in results if "train" in r]
    peers = [r for r in results if is_peer(r) and "train" not in r]
    untuned = [r for r in results if "train" not in r and "peer" not in r]
    if not tuned:
        raise EmbedkitError("no fine-tuned runs under the given folders; `make table-adapt` runs the recipe "
                            "(experiment=adapt) with several seeds")
    models = sorted({r["model"] for r in tuned})
    if len(models) > 1:
        raise EmbedkitError(f"fine-tuned runs of several models ({', '.join(models)}); give --model")
    untuned = [r for r in untuned if r["model"] == models[0]]
    tasks = sorted({t for r in tuned for t in r["scores"]})
    seeds = sorted(tuned, key=lambda r: r.get("seed", 0))
    peer_names = sorted({r["model"] for r in peers})
    title = (f"Adaptation recipe: {models[0]} before and after {len(seeds)} seed(s), beside "
             f"{', '.join(peer_names) or 'no peer'}; V-measure x100")
    t = AdaptTable(title, [])

    def best_untuned(task: str | None) -> tuple[float | None, str]:
        key = (lambda r: r["mean"]) if task is None else (lambda r: r["scores"].get(task, float("-inf")))
        cands = [r for r in untuned if task is None or task in r["scores"]]
        if not cands:
            return None, "-"
        r = max(cands, key=key)
        return key(r), _label(r)

    header = ["set", "untuned best (config)", "recipe before", "recipe after", *peer_names, "after - best peer",
              "wins"]
    rows = []
    for task in [*tasks, None]:
        score, cfg = best_untuned(task)
        pick = (lambda r: r["mean"]) if task is None else (lambda r: r["scores"][task])
        pick_before = (lambda r: r["mean_before"]) if task is None else (lambda r: r["scores_before"][task])
        after = [pick(r) for r in seeds if task is None or task in r["scores"]]
        before = [pick_before(r) for r in seeds if task is None or task in r["scores_before"]]
        peer_scores = []
        for name in peer_names:
            runs = [r for r in peers if r["model"] == name and (task is None or task in r["scores"])]
            peer_scores.append(pick(runs[-1]) if runs else None)
        known = [p for p in peer_scores if p is not None]
        margin = (statistics.mean(after) - max(known)) if after and known else None
        wins = f"{sum(a > max(known) for a in after)}/{len(after)}" if after and known else "-"
        label = "mean" if task is None else task
        if score is not None:
            t.bars.setdefault("untuned best", {})[label] = (score, None)
        if after:
            t.bars.setdefault("recipe (seeds' mean, std)", {})[label] = (
                statistics.mean(after), statistics.stdev(after) if len(after) > 1 else None)
        for name, p in zip(peer_names, peer_scores):
            if p is not None:
                t.bars.setdefault(name, {})[label] = (p, None)
        rows.append(["**mean**" if task is None else task, f"{fmt_score(score)} ({cfg})", _mean_std(before),
                     _mean_std(after), *(fmt_score(p) for p in peer_scores),
                     "-" if margin is None else f"{100 * margin:+.1f}", wins])
    t.sections.append(("1. Per set: untuned best, the recipe (mean +- std over seeds), the peers", header, rows))

    seed_rows = []
    for r in seeds:
        tr = r["train"]
        seed_rows.append([str(r.get("seed", "-")), str(tr.get("steps")), str(tr.get("stopped_by", "steps")),
                          f"{tr.get('wall_s', 0):.0f}", str(tr.get("pairs_seen", "-")),
                          f"{100 * r['mean_before']:.1f}", f"{100 * r['mean']:.1f}"])
    t.sections.append(("2. Recipe runs (one per seed)",
                       ["seed", "steps", "stopped by", "train s", "pairs seen", "mean before", "mean after"],
                       seed_rows))
    walls = [r["train"].get("wall_s", 0) for r in seeds]
    pairs = {str(r["train"].get("pairs", {}).get("name", r["train"].get("pairs"))) for r in seeds}
    t.notes.append(f"training: {', '.join(sorted(pairs))}; {statistics.mean(walls) / 60:.1f} min per seed on average "
                   f"(the training loop only; max {max(walls) / 60:.1f} min)")
    t.notes.append("'wins': seeds whose tuned score beats the best peer on that set; 'after - best peer' uses "
                   "the seeds' mean")
    if not peers:
        t.notes.append("no peer runs among these folders (make table-adapt runs model=minilm)")
    if not untuned:
        t.notes.append("no untuned LLM runs among these folders")
    return t
