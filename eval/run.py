"""``run_eval``: greedy generation over a dataset, scoring, per-category accuracy; and the text table of a result.

The results dict (what ``vlsi-eval --out`` writes) is JSON-able::

    {"model", "data", "accuracy", "n", "correct", "n_unscored", "per_category": {cat: {accuracy, n, correct}},
     "per_kind": {"mc"|"short": ...}, "n_skipped", "skipped": [{id, reason, source}], "generated_tokens",
     "wall_s", "samples_per_s", "tokens_per_s", "max_new_tokens", "batch_size", "device",
     "predictions": [{id, category, kind, prediction, extracted, gold, correct, stopped, new_tokens}]}

Accuracies are fractions in [0, 1] (``None`` when nothing was scored).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from vlsi.eval.scoring import aggregate, score
from vlsi.models.data import BadSamplePolicy, read_dataset

__all__ = ["load_eval_samples", "run_eval", "format_table"]


def load_eval_samples(path: str | os.PathLike, *, image_root=None, policy: BadSamplePolicy | None = None) -> Iterator:
    """Samples of an eval file: MMBench-style ``.tsv``, or the project's LLaVA ``.json``/``.jsonl``/``.parquet``."""
    policy = policy or BadSamplePolicy("error")
    if Path(path).suffix.lower() == ".tsv":
        from vlsi.eval.mmbench import read_mmbench_tsv

        return read_mmbench_tsv(path, on_bad_sample=policy)
    return read_dataset(path, image_root=image_root, on_bad_sample=policy)


def run_eval(
    model,
    data: str | os.PathLike,
    *,
    image_root=None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_length: int | None = None,
    limit: int | None = None,
    on_bad_sample: str = "error",
    device=None,
    dtype=None,
    device_map=None,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` (a model directory / preset, or a loaded ``ModelAdapter``) on ``data``; see module doc.

    ``device`` / ``dtype`` / ``device_map`` go to ``load_model`` (``device_map="auto"`` spreads a big model over all
    GPUs). ``limit`` evaluates the first ``limit`` samples only. ``on_bad_sample="skip"`` leaves unreadable or too-long
    samples out (listed under ``skipped``); ``"error"`` stops at the first one.
    """
    import itertools

    from vlsi.eval.generate import generate_answers

    policy = BadSamplePolicy(on_bad_sample)
    samples = iter(load_eval_samples(data, image_root=image_root, policy=policy))
    if limit is not None:
        samples = itertools.islice(samples, limit)
    # Read the first sample before loading the model: a malformed data file fails in a second, not after a load.
    first = next(samples, None)
    samples = itertools.chain([first] if first is not None else [], samples)
    if isinstance(model, (str, os.PathLike)):
        from vlsi.models.adapter import load_model

        adapter = load_model(model, dtype=dtype, device=device, device_map=device_map)
        model_name = str(model)
    else:
        adapter, model_name = model, getattr(model, "name", "model")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="eval", unit="sample", dynamic_ncols=True)
    rows = []
    n_tokens = 0
    t0 = time.perf_counter()
    try:
        for sample, gen in generate_answers(adapter, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                            max_length=max_length, policy=policy, progress=bar):
            s = score(gen.text, sample)
            n_tokens += len(gen.token_ids) + int(gen.stopped)
            rows.append({
                "id": sample.id,
                "category": (sample.meta or {}).get("category"),
                "kind": s["kind"],
                "prediction": gen.text,
                "extracted": s["extracted"],
                "gold": s["gold"],
                "correct": s["correct"],
                "stopped": gen.stopped,
                "new_tokens": len(gen.token_ids),
            })
            if bar is not None:
                bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    out = {"model": model_name, "data": str(data)}
    out.update(aggregate(rows))
    out.update({
        "n_skipped": policy.report.count,
        "skipped": [{"id": e.id, "reason": e.reason, "source": e.source} for e in policy.report.entries],
        "generated_tokens": n_tokens,
        "wall_s": round(wall, 3),
        "samples_per_s": round(len(rows) / wall, 3) if wall > 0 else None,
        "tokens_per_s": round(n_tokens / wall, 3) if wall > 0 else None,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "device": str(adapter.device),
        "predictions": rows,
    })
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(results: dict) -> str:
    """A plain-text table: overall, per kind and per category accuracy (%), counts, and throughput."""
    lines = [f"model: {results.get('model')}", f"data:  {results.get('data')}"]
    rows = [("overall", results)]
    rows += [(f"kind: {k}", v) for k, v in results.get("per_kind", {}).items()]
    rows += [(k, v) for k, v in results.get("per_category", {}).items()]
    w = max(len(r[0]) for r in rows)
    lines.append(f"{'group':<{w}}  {'acc %':>6}  {'correct':>7}  {'n':>5}")
    lines.append("-" * (w + 24))
    for name, r in rows:
        lines.append(f"{name:<{w}}  {_pct(r.get('accuracy')):>6}  {r.get('correct', 0):>7}  {r.get('n', 0):>5}")
    extra = []
    if results.get("n_unscored"):
        extra.append(f"{results['n_unscored']} without a gold answer")
    if results.get("n_skipped"):
        extra.append(f"{results['n_skipped']} skipped")
    if results.get("wall_s") is not None:
        extra.append(f"{results['wall_s']:.1f} s, {results.get('samples_per_s') or 0:.2f} samples/s, "
                     f"{results.get('tokens_per_s') or 0:.1f} generated tokens/s")
    if extra:
        lines.append("; ".join(extra))
    return "\n".join(lines)
