"""Rendering of the per-layer answers (``vlsi-eval layers``): a text table and a PNG, one column per model."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["format_layer_table", "plot_layer_table"]


def _columns(views: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: row r shows each model's r-th layer (models may have different numbers of layers)."""
    header = []
    cols = []
    for v in views:
        header.append(v["model"])
        cols.append([f"{a['layer']}: {a['text']!r}" for a in v["answers"]])
    n = max(len(c) for c in cols)
    rows = [[c[r] if r < len(c) else "" for c in cols] for r in range(n)]
    return header, rows


def format_layer_table(result: dict) -> str:
    """``result`` = ``{"sample_id", "question", "gold", "views": [{"model", "answers": [{layer, text}]}]}``."""
    header, rows = _columns(result["views"])
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(header)]
    widths = [min(w, 60) for w in widths]
    out = [f"sample {result['sample_id']}: {result.get('question', '')!r}  (gold: {result.get('gold')!r})"]
    out.append("  |  ".join(h[:w].ljust(w) for h, w in zip(header, widths)))
    out.append("-+-".join("-" * w for w in widths))
    for r in rows:
        out.append("  |  ".join(cell[:w].ljust(w) for cell, w in zip(r, widths)))
    return "\n".join(out)


def plot_layer_table(result: dict, path: str | os.PathLike) -> Path:
    """The same table as a PNG (the paper's Figure 3 layout: layers top to bottom, one column per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = _columns(result["views"])
    clip = lambda s: s if len(s) <= 48 else s[:45] + "..."  # noqa: E731
    cells = [[clip(c) for c in r] for r in rows]
    fig, ax = plt.subplots(figsize=(1 + 4.5 * len(header), 1.2 + 0.35 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=[clip(h) for h in header], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    q = result.get("question", "")
    ax.set_title(f"sample {result['sample_id']}: {clip(q.replace(chr(10), ' '))}\ngold: {result.get('gold')!r}",
                 fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
