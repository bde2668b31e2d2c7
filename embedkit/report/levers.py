"""The levers table (``embedkit-report DIR --table levers``, ``make table-levers``): what each training-free
lever beyond the paper does on one model, from the runs of ``conf/experiment/table_levers_*.yaml``:

1. V-measure per decoder block for ``mean`` and ``last`` pooling (and ``levers.png``, a line per pooling,
   the best block marked);
2. ``span=all`` vs ``span=text`` for mean and weighted mean, per prompt;
3. echo embeddings vs the same template with one copy of the text;
4. each MetaEOL member vs the ensemble.

Cells are V-measure x 100, per task and their mean; a section without runs is left out with a note."""

from __future__ import annotations

import csv
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write
from embedkit.report.results import fmt_score, is_peer

__all__ = ["LeverTables", "levers_table"]


def _spec(r: dict) -> dict:
    return r.get("pooling_spec") or {"mode": r["pooling"], "layer": -1, "span": "all", "final_norm": "auto"}


def _block(r: dict) -> int | None:
    """The single block a run pooled (non-negative), or None for a list of blocks."""
    resolved = _spec(r).get("layers_resolved")
    if resolved is not None:
        return resolved[0] if len(resolved) == 1 else None
    layer = _spec(r)["layer"]
    return layer if isinstance(layer, int) else None


@dataclass
class LeverTables:
    """Several titled sections (header, rows), written as one markdown file and one CSV, plus the per-layer
    curves for ``levers.png``."""

    title: str
    sections: list[tuple[str, list[str], list[list[str]]]]
    notes: list[str] = field(default_factory=list)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # pooling -> block -> mean V
    heat: None = None  # no heat map: the layer curves are a line plot

    def markdown(self) -> str:
        """All sections as markdown (``###`` titles), then the notes."""
        out = [f"## {self.title}", ""]
        for title, header, rows in self.sections:
            out += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write_csv(self, path: Path) -> None:
        """Every section's rows with the section title in the first column; returns None."""
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for title, header, rows in self.sections:
                w.writerow(["section", *header])
                w.writerows([[title, *[c.replace("**", "") for c in row]] for row in rows])

    def line_plot(self, path: Path) -> bool:
        """``levers.png``: mean V-measure per block, a line per pooling, the best block of each marked.
        Returns whether there was anything to plot."""
        if not self.curves:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for mode, curve in sorted(self.curves.items()):
            xs = sorted(curve)
            ys = [100 * curve[x] for x in xs]
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=mode)
            best = xs[int(np.argmax(ys))]
            ax.plot([best], [100 * curve[best]], marker="*", markersize=14, color=line.get_color())
            right = best > (xs[0] + xs[-1]) / 2  # keep the label inside the axes
            ax.annotate(f"best: block {best}, {100 * curve[best]:.1f}", (best, 100 * curve[best]),
                        textcoords="offset points", xytext=(-8 if right else 8, -14), ha="right" if right else "left",
                        fontsize=8, color=line.get_color())
        ax.set_xlabel("decoder block pooled (0 = first; the last is transformers' last hidden state)")
        ax.set_ylabel("mean V-measure x 100")
        ax.set_title(textwrap.fill(self.title, 90), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        plt.close(fig)
        return True


def _task_rows(runs: list[tuple[list[str], dict]], tasks: list[str]) -> list[list[str]]:
    """Rows of (label cells, result): per-task scores and the mean, the best mean in bold."""
    best = max((r["mean"] for _, r in runs), default=None)
    return [[*labels, *(fmt_score(r["scores"].get(t)) for t in tasks), fmt_score(r["mean"], r["mean"] == best)]
            for labels, r in runs]


def levers_table(results: list[dict], refs: dict | None = None) -> LeverTables:
    """The four lever sections from untuned runs (see the module doc)."""
    peers = [r for r in results if is_peer(r) and "train" not in r]
    results = [r for r in results if "train" not in r and "peer" not in r]
    if not results:
        raise EmbedkitError("no untuned LLM runs under the given folders; run `make table-levers` first")
    models = sorted({r["model"] for r in results})
    tasks = sorted({t for r in results for t in r["scores"]})
    title = f"Levers beyond the paper: {', '.join(models)}, V-measure x100 on {', '.join(tasks)}"
    t = LeverTables(title, [])
    plain = lambda r: _spec(r)["final_norm"] == "auto" and _spec(r)["span"] == "all"  # noqa: E731

    layer_runs = [r for r in results if plain(r) and _block(r) is not None and _spec(r)["mode"] in ("mean", "last")]
    prompts = sorted({r["prompt"] for r in layer_runs}, key=lambda p: -sum(r["prompt"] == p for r in layer_runs))
    if layer_runs and len({_block(r) for r in layer_runs}) > 1:
        prompt = prompts[0]  # the prompt the layer sweep ran with
        for r in layer_runs:
            if r["prompt"] == prompt:
                t.curves.setdefault(_spec(r)["mode"], {})[_block(r)] = r["mean"]
        blocks = sorted({b for c in t.curves.values() for b in c})
        modes = sorted(t.curves)
        best = {m: max(t.curves[m].values()) for m in modes}
        rows = [[str(b), *(fmt_score(t.curves[m].get(b), t.curves[m].get(b) == best[m]) for m in modes)] for b in blocks]
        t.sections.append((f"1. Mean V-measure per decoder block (prompt={prompt}, span=all)", ["block", *modes], rows))
        last = max(blocks)
        for m in modes:
            b = max(t.curves[m], key=t.curves[m].get)
            t.notes.append(f"{m}: best block {b} ({fmt_score(best[m])}) vs the last block {last} "
                           f"({fmt_score(t.curves[m].get(last))})")
    else:
        t.notes.append("no layer sweep among these runs (make table-levers runs one)")

    span_runs = [r for r in results if _block(r) is not None and _spec(r)["layer"] == -1
                 and _spec(r)["mode"] in ("mean", "weighted_mean") and _spec(r)["final_norm"] == "auto"]
    keys = sorted({(r["prompt"], _spec(r)["mode"]) for r in span_runs if not r["prompt"].startswith("echo")})
    rows = []
    for prompt, mode in keys:
        by_span = {_spec(r)["span"]: r["mean"] for r in span_runs if (r["prompt"], _spec(r)["mode"]) == (prompt, mode)}
        if len(by_span) == 2:
            rows.append([prompt, mode, fmt_score(by_span["all"]), fmt_score(by_span["text"]),
                         f"{100 * (by_span['text'] - by_span['all']):+.1f}"])
    if rows:
        t.sections.append(("2. Pooled tokens: prompt and text (all) vs the text's own (text), last block",
                           ["prompt", "pooling", "span=all", "span=text", "change"], rows))

    echo = [r for r in results if r["prompt"] in ("echo", "echo_once") and _spec(r)["layer"] == -1
            and _spec(r)["final_norm"] == "auto"]
    echo = [r for r in echo if _spec(r)["span"] == "all" or _spec(r)["mode"] not in ("last", "eos")]  # span: no-op
    echo.sort(key=lambda r: (_spec(r)["mode"], _spec(r)["span"], r["prompt"]))
    if echo:
        runs = [([r["prompt"], _spec(r)["mode"], _spec(r)["span"]], r) for r in echo]
        t.sections.append(("3. Echo embeddings (text twice, pool the last copy) vs one copy",
                           ["prompt", "pooling", "span", *tasks, "mean"], _task_rows(runs, tasks)))

    meta = [r for r in results if (r["prompt"] == "metaeol" or r["prompt"].startswith("metaeol_"))
            and _spec(r)["mode"] == "last" and _spec(r)["layer"] == -1]
    meta.sort(key=lambda r: (r["prompt"] == "metaeol", r["prompt"]))
    if meta:
        runs = [([r["prompt"]], r) for r in meta]
        t.sections.append(("4. MetaEOL: each meta-task prompt vs their ensemble (last-token pooling)",
                           ["prompt", *tasks, "mean"], _task_rows(runs, tasks)))
    for r in peers:  # a purpose-built embedder on the same tasks, for scale
        if set(r["scores"]) == set(tasks):
            t.notes.append(f"peer {r['model']} (sentence-transformers) on the same tasks: {fmt_score(r['mean'])} ("
                           + ", ".join(f"{k} {fmt_score(v)}" for k, v in sorted(r["scores"].items())) + ")")
    if not t.sections:
        raise EmbedkitError("none of the lever sections has runs under the given folders; run `make table-levers`")
    return t
