"""The attention analysis' figures: a bar chart per example text (``example_<i>.png``, one panel per variant)
and the text share per layer over a data set (``aggregate_layers.png``), written as PNG by ``save_figure``.

matplotlib is imported inside the functions, with the Agg backend: importing this module costs nothing
and never picks a display backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.attention.layers import layer_description
from embedkit.attention.measure import PROMPT, SPECIAL, TEXT, Aggregate, Example
from embedkit.embed.prompts import Prompt
from embedkit.io import atomic_write

COLOURS = {TEXT: "#d9711c", PROMPT: "#7f8c9a", SPECIAL: "#b0b0b0"}


def example_figure(variants: list[Example], *, model: str, prompt: Prompt, layers: list[int], heads: str,
                   n_heads: int | None, text: str):
    """Horizontal bars, tokens top to bottom in reading order, one panel per variant (shared axes).

    Takes one text's ``Example`` per variant and what the titles name; returns the matplotlib figure (the
    rows are averaged over ``layers``; the sink, position 0, is left out of the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = variants[0]
    n_layers = first.rows.shape[0]
    labels, roles = first.labels[1:], first.roles[1:]  # position 0 is the sink: dropped
    n = len(labels)
    y = np.arange(n)
    fig, axes = plt.subplots(1, len(variants), sharey=True, sharex=True, squeeze=False,
                             figsize=(2.2 + 3.9 * len(variants), max(3.6, 0.26 * n + 2.4)))
    label_size = 10 if n <= 40 else 8 if n <= 70 else 6
    rows = [ex.rows[layers].mean(0) for ex in variants]
    xmax = max(float(r[1:].max()) if n else 0.0 for r in rows) or 1.0
    for ax, ex, row in zip(axes[0], variants, rows):
        vals = row[1:]
        ax.barh(y, vals, color=[COLOURS[r] for r in roles], height=0.8)
        rest = vals.sum()
        text_mass = vals[np.array(roles) == TEXT].sum()
        sink = f"sink (position 0, '{first.labels[0]}'): {row[0]:.3f}, not shown"
        ax.set_title(f"{ex.variant}\non the text's tokens: {text_mass:.3f} ({text_mass / rest:.0%} of non-sink)\n{sink}"
                     if rest > 0 else f"{ex.variant}\n{sink}", fontsize=10)
        if n <= 60:
            for yi, v in zip(y, vals):
                ax.text(v + xmax * 0.01, yi, f"{v:.3f}", va="center", fontsize=max(label_size - 3, 5),
                        color="#333333")
        ax.set_xlim(0, xmax * 1.18)
        ax.set_xlabel(f"attention weight ({heads} over {n_heads or '?'} heads)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    ax0 = axes[0][0]
    ax0.set_yticks(y, labels, fontsize=label_size)
    ax0.set_ylim(n - 0.5, -0.5)  # reading order, top to bottom
    for tick, role in zip(ax0.get_yticklabels(), roles):
        tick.set_color(COLOURS[role] if role != TEXT else "#a04f0c")
    if n:
        ax0.get_yticklabels()[-1].set_fontweight("bold")  # the final token (its own attention included)
    layer_text = layer_description(layers, n_layers)
    template = prompt.template if len(prompt.template) <= 90 else prompt.template[:87] + "..."
    fig.suptitle(f"Final-token attention · {model} · prompt '{prompt.name}' · {layer_text}\n"
                 f"template: {template}", fontsize=11)
    short = text if len(text) <= 80 else text[:77] + "..."
    fig.text(0.5, 0.005, "orange: the text's own tokens · grey: prompt tokens · bold: the final token (its state is "
             f"the 'last' pooling)\ntext: {short}" + (" (truncated)" if first.truncated else ""),
             ha="center", va="bottom", fontsize=8, color="#333333")
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    return fig


def aggregate_figure(aggs: list[Aggregate], *, model: str, prompt: Prompt, layers: list[int], heads: str):
    """Text share per layer: one panel per task, one directly labelled line per variant.

    Takes the ``Aggregate`` of every (task, variant) and what the titles name; returns the matplotlib
    figure (``layers``, the selected layers, are shaded unless they are all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(a.task for a in aggs))
    variants = list(dict.fromkeys(a.variant for a in aggs))
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, sharey=True,
                             figsize=(max(8.5, 1.5 + 5.8 * len(tasks)), 5.2))
    for ax, task in zip(axes[0], tasks):
        mine = [a for a in aggs if a.task == task]
        n_layers = len(mine[0].per_text[0].text)
        x = np.arange(n_layers)
        if layers != list(range(n_layers)):
            for layer in layers:
                ax.axvspan(layer - 0.5, layer + 0.5, color="#fff2cc", zorder=0)
        ends = []
        for a in mine:
            st = a.layer_stats()
            se = st["text_share_sd"] / np.sqrt(max(a.n_texts, 1))
            ax.plot(x, st["text_share"], color=colours[a.variant], lw=2, marker="o", ms=3)
            ax.fill_between(x, st["text_share"] - se, st["text_share"] + se, color=colours[a.variant], alpha=0.15,
                            lw=0)
            ends.append([float(st["text_share"][-1]), a.variant, colours[a.variant]])
        uniform = float(mine[0].layer_stats()["text_positions"][0])
        ax.plot([0, n_layers - 1], [uniform, uniform], color="#555555", ls=":", lw=1.2)
        ends.append([uniform, "uniform over tokens", "#555555"])
        ends.sort(key=lambda e: e[0])
        for k in range(1, len(ends)):  # keep the end labels apart
            ends[k][0] = max(ends[k][0], ends[k - 1][0] + 0.045)
        for yv, name, colour in ends:
            ax.text(n_layers - 0.4, yv, name, color=colour, va="center", fontsize=9, fontweight="bold")
        ax.set_xlim(-0.5, n_layers - 1 + max(6, 0.3 * n_layers))
        ax.set_xticks(sorted({*range(0, n_layers, 5), n_layers - 1}))
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer (0 = first)")
        ax.set_title(f"{task} · {mine[0].n_texts} texts", fontsize=10)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_ylabel("share on the text's own tokens\n(of the non-sink attention)")
    sel = "" if len(layers) == n_layers else " · shaded: selected layers"
    fig.suptitle(f"Share of the final token's attention on the text's own tokens vs the prompt's\n"
                 f"{model} · prompt '{prompt.name}' · {heads} over heads · sink (position 0) excluded\n"
                 f"band: ±1 standard error over texts · dotted: the text's share of the positions (uniform "
                 f"attention){sel}", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` as PNG (110 dpi, atomically) and close it; returns None."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
