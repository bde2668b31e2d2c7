"""The report's heat map (``report.png``, ``table-NAME.png``): one cell a score, V-measure x 100.

matplotlib is imported inside ``heatmap``, with the Agg backend: importing this module costs nothing and
never picks a display backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.io import atomic_write


def heatmap(path: Path, title: str, rows: str, cols: str, row_keys, col_keys, cells) -> None:
    """Write the heat map of ``cells`` ({(row key, col key): score}) as PNG at ``path``: rows ``row_keys``
    (labelled ``rows``) by columns ``col_keys`` (labelled ``cols``), each cell's value written in it, a
    missing cell left blank; returns None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[cells.get((r, c), np.nan) for c in col_keys] for r in row_keys])
    fig, ax = plt.subplots(figsize=(1.3 * len(col_keys) + 2.5, 0.6 * len(row_keys) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_keys)), col_keys, rotation=30, ha="right")
    ax.set_yticks(range(len(row_keys)), row_keys)
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i in range(len(row_keys)):
        for j in range(len(col_keys)):
            if not np.isnan(grid[i, j]):
                dark = (grid[i, j] - lo) < 0.5 * (hi - lo)
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="V-measure x 100")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
