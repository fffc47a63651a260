"""Layer-matching views from a training run's ``metrics.jsonl`` (VLsI Figure 5) and per-layer KL curves.

Input: one JSON object per line, written by ``vlsi-train``; this module reads only ``stage``, ``step``, ``matched``
(teacher target index matched to each student target layer, interaction steps; a list of such lists when the step
drew once per micro-batch, each draw counting as one observation) and ``kl`` (per-layer list, or a
``{layer: value}`` dict), and ignores every other key. Optional layer labels: ``student_layers`` / ``teacher_layers``
(decoder-layer ids) in any metrics row or in ``ODIR/summary.json`` / ``config.json`` / ``run.json``; without them the axes show
target indices.

Outputs (matplotlib, Agg backend, no display needed):

* ``matching_heatmap.png``: two panels, start and end windows of the interaction stage (default: its first and last
  20% of steps); rows = student target layers, columns = teacher target layers, colour = fraction of the window's
  steps in which that student layer was matched to that teacher layer (each row sums to 1).
* ``kl_curves.png``: the per-layer KL against step, one line per layer, stage boundaries marked.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vlsi.models.errors import VlsiError

__all__ = ["read_metrics", "matching_counts", "plot_matching", "plot_kl_curves", "matching_report"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a file, or a run folder holding one); a malformed line is an error naming
    the file and line; blank lines are skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise VlsiError(f"{p}: metrics file not found")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VlsiError(f"{p}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise VlsiError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _interaction_rows(rows: list[dict], source: str) -> list[dict]:
    out = []
    for r in rows:
        m = r.get("matched")
        if r.get("stage") != "interact" or not isinstance(m, list):
            continue
        if m and all(isinstance(x, list) for x in m):  # vlsi-train logs one draw per micro-batch of the step
            out.extend(dict(r, matched=x) for x in m)
        else:
            out.append(r)
    if not out:
        raise VlsiError(f"{source}: no interaction-stage rows with 'matched' (was the interact stage run?)")
    ts = len(out[0]["matched"])
    for r in out:
        if len(r["matched"]) != ts:
            raise VlsiError(f"{source}: step {r.get('step')}: 'matched' has {len(r['matched'])} entries, "
                            f"earlier rows have {ts}")
        if any(not isinstance(j, int) or isinstance(j, bool) or j < 0 for j in r["matched"]):
            raise VlsiError(f"{source}: step {r.get('step')}: 'matched' must hold non-negative integers")
    return out


def matching_counts(rows: list[dict], *, window: float = 0.2, n_teacher: int | None = None,
                    source: str = "metrics") -> dict:
    """Match-frequency matrices of the start and end windows of the interaction stage.

    ``window``: fraction of the interaction steps in each window (at least one step). Returns
    ``{"start": [[float]] (ts x tl), "end": ..., "start_steps": [first, last], "end_steps": ..., "n_steps",
    "n_student", "n_teacher"}``; each matrix row is the fraction of the window's steps matched to each column.
    """
    import numpy as np

    if not 0 < window <= 1:
        raise ValueError(f"window must be in (0, 1], got {window}")
    inter = _interaction_rows(rows, source)
    inter.sort(key=lambda r: r.get("step", 0))
    ts = len(inter[0]["matched"])
    tl = max(max(r["matched"]) for r in inter) + 1
    if n_teacher is not None:
        if n_teacher < tl:
            raise VlsiError(f"{source}: matched index {tl - 1} >= number of teacher target layers {n_teacher}")
        tl = n_teacher
    w = max(1, math.ceil(window * len(inter)))

    def freq(part):
        m = np.zeros((ts, tl))
        for r in part:
            m[np.arange(ts), r["matched"]] += 1
        return (m / len(part)).tolist()

    start, end = inter[:w], inter[-w:]
    return {"start": freq(start), "end": freq(end), "n_steps": len(inter), "n_student": ts, "n_teacher": tl,
            "start_steps": [start[0].get("step"), start[-1].get("step")],
            "end_steps": [end[0].get("step"), end[-1].get("step")]}


RUN_FILES = ("summary.json", "config.json", "run.json")


def _run_value(run_dir: Path | None, rows: list[dict], key: str, n: int | None = None) -> list | None:
    """``key`` (a list, of length ``n`` if given) from the metrics rows, else from the run folder's JSON files
    (vlsi-train's ``summary.json`` holds ``student_layers`` / ``teacher_layers``)."""
    ok = lambda v: isinstance(v, list) and (n is None or len(v) == n)  # noqa: E731
    for r in rows:
        if ok(r.get(key)):
            return r[key]
    for name in RUN_FILES if run_dir is not None else ():
        p = run_dir / name
        if p.is_file():
            try:
                cfg = json.loads(p.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(cfg, dict) and ok(cfg.get(key)):
                return cfg[key]
    return None


def _labels(run_dir: Path | None, rows: list[dict], key: str, n: int) -> list[str]:
    found = _run_value(run_dir, rows, key, n)
    if found is not None:
        return [str(x) for x in found]
    return [f"#{i}" for i in range(n)]


def plot_matching(counts: dict, path: str | os.PathLike, *, student_labels=None, teacher_labels=None,
                  title: str = "layer matching") -> Path:
    """Write the start-vs-end heatmap PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ts, tl = counts["n_student"], counts["n_teacher"]
    sl = student_labels or [f"#{i}" for i in range(ts)]
    tlab = teacher_labels or [f"#{j}" for j in range(tl)]
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.9 * max(tl, 4) * 2, 2.5 + 0.5 * max(ts, 3)), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], ("start", "end")):
        m = np.asarray(counts[key])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            if v > 0:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        a, b = counts[f"{key}_steps"]
        ax.set_title(f"{key} of interaction (steps {a}-{b})")
        ax.set_xticks(range(tl), tlab, rotation=90 if tl > 12 else 0)
        ax.set_yticks(range(ts), sl)
        ax.set_xlabel("teacher target layer")
        ax.set_ylabel("student target layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of steps matched")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _row_kl(r: dict):
    """A row's per-layer KL: ``kl`` (list or dict), or vlsi-train's ``layer_kl`` (student target layers, at the
    matched teacher layer) followed by ``final_kl``."""
    if "kl" in r:
        return r["kl"]
    if isinstance(r.get("layer_kl"), list):
        return list(r["layer_kl"]) + ([r["final_kl"]] if "final_kl" in r else [])
    return None


def _kl_series(rows: list[dict]) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, str]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    stages: list[tuple[float, str]] = []
    for n, r in enumerate(rows):
        step = r.get("step", n)
        stage = r.get("stage")
        if stage is not None and (not stages or stages[-1][1] != stage):
            stages.append((step, stage))
        kl = _row_kl(r)
        if isinstance(kl, dict):
            items = list(kl.items())
        elif isinstance(kl, list):
            items = [(str(i), v) for i, v in enumerate(kl)]
        else:
            continue
        for name, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(str(name), []).append((step, float(v)))
    return series, stages


def plot_kl_curves(rows: list[dict], path: str | os.PathLike, *, layer_labels=None, source: str = "metrics") -> Path:
    """Per-layer KL against step (every row with a ``kl`` field, all stages); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, stages = _kl_series(rows)
    if not series:
        raise VlsiError(f"{source}: no rows with a per-layer 'kl' field")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (name, pts) in enumerate(series.items()):
        label = layer_labels[k] if layer_labels and k < len(layer_labels) else name
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"layer {label}", lw=1.2)
    for step, stage in stages:
        ax.axvline(step, color="grey", ls=":", lw=0.8)
        ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=8, va="top", color="grey")
    positive = all(p[1] > 0 for pts in series.values() for p in pts)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("per-layer KL")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def matching_report(run: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, window: float = 0.2) -> dict:
    """Both PNGs for a run folder (or a metrics file); written to ``out_dir`` (default: the run folder).

    Returns ``{"heatmap": path, "kl_curves": path|None, "counts": matching_counts(...), "student_layers",
    "teacher_layers"}``. KL curves are skipped (``None``) when no row has a ``kl`` field.
    """
    run = Path(run)
    run_dir = run if run.is_dir() else run.parent
    source = str(run / "metrics.jsonl" if run.is_dir() else run)
    rows = read_metrics(run)
    out = Path(out_dir) if out_dir is not None else run_dir
    probe = _interaction_rows(rows, source)
    ts = len(probe[0]["matched"])
    teacher_from = _run_value(run_dir, rows, "teacher_layers")
    counts = matching_counts(rows, window=window, n_teacher=len(teacher_from) if teacher_from else None,
                             source=source)
    sl = _labels(run_dir, rows, "student_layers", ts)
    tlab = _labels(run_dir, rows, "teacher_layers", counts["n_teacher"])
    heat = plot_matching(counts, out / "matching_heatmap.png", student_labels=sl, teacher_labels=tlab,
                         title=f"layer matching: {run_dir.name}")
    kl_path = None
    if any(_row_kl(r) is not None for r in rows):
        kl_labels = sl + ["final"] if sl and not sl[0].startswith("#") else None
        kl_path = plot_kl_curves(rows, out / "kl_curves.png", layer_labels=kl_labels, source=source)
    return {"heatmap": str(heat), "kl_curves": str(kl_path) if kl_path else None, "counts": counts,
            "student_layers": sl, "teacher_layers": tlab}
