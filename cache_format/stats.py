"""Per-layer statistics of a cache (``vlsi-cache stats``): how much of each layer's distribution top-k keeps, how
peaked it is, and what it costs to store.

For each row of the layer axis (target layers ascending, then ``final``), over every answer position of the cache:

* ``coverage_mean`` / ``coverage_min``: top-k mass covered, ``1 - exp(tail_logmass)`` (the tail is stored in fp32,
  so this does not inherit the fp16 rounding of the log-probs). Shallow layers are flatter: top-k covers less.
* ``entropy_lb_mean``: mean entropy (nats) of the coarse-grained distribution (k tokens + one tail bucket),
  ``-sum p_i log p_i - m log m`` with ``m`` the tail mass. Merging the tail into one bucket can only lower entropy,
  so this is a lower bound of the full distribution's entropy. ``entropy_ub_mean`` spreads the tail uniformly over
  the other ``vocab_size - k`` tokens, the largest entropy compatible with the stored top-k: the true entropy lies
  between the two bounds.
* ``top1_prob_mean``: mean probability of the top token; ``top1_agrees_final``: fraction of positions whose top
  token equals the final head's top token.
* ``raw_bytes_per_answer_token``: uncompressed bytes of this layer's row (k ids int32 + k values in the value
  encoding's dtype + the fp32 tail); ``stored_bytes_per_answer_token``: the cache's bytes on disk apportioned to this
  layer by its raw share (an estimate: compression differs between arrays).

Only numpy and matplotlib (for the plot) are used; everything streams sample by sample in float64.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .encodings import get_encoding

__all__ = ["cache_stats", "format_cache_stats", "plot_cache_stats", "row_kl", "kl_vs_reference",
           "format_kl_vs_reference"]


def _xlogx(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def cache_stats(reader, *, limit: int | None = None) -> dict:
    """Statistics of ``reader`` (a ``CacheReader``; the first ``limit`` samples if given). See the module doc.

    Returns ``{"url", "n_samples", "n_answer_tokens", "top_k", "vocab_size", "value_encoding", "layers",
    "per_layer": [{"layer", "coverage_mean", "coverage_min", "entropy_lb_mean", "entropy_ub_mean",
    "top1_prob_mean", "top1_agrees_final", "raw_bytes_per_answer_token", "stored_bytes_per_answer_token"}],
    "raw_bytes_per_answer_token", "stored_bytes_per_answer_token", "bytes_on_disk"}``; means are ``None`` when the
    cache has no answer positions.
    """
    fp = reader.fingerprint
    L, k, V = fp.n_layers, fp.top_k, fp.vocab_size
    names = list(fp.layer_names)
    log_rest = math.log(V - k) if V > k else 0.0
    cov_sum = np.zeros(L)
    cov_min = np.full(L, np.inf)
    hlb_sum = np.zeros(L)
    hub_sum = np.zeros(L)
    top1_sum = np.zeros(L)
    agree_sum = np.zeros(L)
    n_ans = n_samples = n_tokens = 0
    for rec in reader.iter() if hasattr(reader, "iter") else iter(reader):
        if limit is not None and n_samples >= limit:
            break
        n_samples += 1
        n_tokens += int(len(rec.input_ids))
        lp = np.asarray(rec.topk_logprobs, dtype=np.float64)  # [A, L, k]
        if lp.shape[0] == 0:
            continue
        tail = np.asarray(rec.tail_logmass, dtype=np.float64)  # [A, L]
        p = np.exp(lp)
        m = np.exp(tail)
        cov = 1.0 - m
        hlb = -_xlogx(p).sum(-1) - _xlogx(m)
        cov_sum += cov.sum(0)
        cov_min = np.minimum(cov_min, cov.min(0))
        hlb_sum += hlb.sum(0)
        hub_sum += (hlb + m * log_rest).sum(0)
        top1_sum += p[:, :, 0].sum(0)
        ids = np.asarray(rec.topk_ids)
        agree_sum += (ids[:, :, 0] == ids[:, -1:, 0]).sum(0)
        n_ans += lp.shape[0]

    enc = get_encoding(fp.value_encoding)
    raw_layer = k * (4 + enc.dtype.itemsize) + 4
    # Per answer token the cache also stores its share of input ids (int32) and the answer position (int32).
    raw_total = L * raw_layer + 4 + (4 * n_tokens / n_ans if n_ans else 0.0)
    nbytes = None
    if hasattr(reader, "bytes_on_disk") and limit is None:
        try:
            nbytes = int(reader.bytes_on_disk())
        except Exception:  # noqa: BLE001 - size is informative only (some object stores cannot `du`)
            nbytes = None
    stored_total = nbytes / n_ans if (nbytes is not None and n_ans) else None

    def mean(x):
        return (x / n_ans).tolist() if n_ans else [None] * L

    per_layer = []
    cm, hl, hu, t1, ag = mean(cov_sum), mean(hlb_sum), mean(hub_sum), mean(top1_sum), mean(agree_sum)
    for i, name in enumerate(names):
        per_layer.append({
            "layer": name,
            "coverage_mean": cm[i],
            "coverage_min": float(cov_min[i]) if n_ans else None,
            "entropy_lb_mean": hl[i],
            "entropy_ub_mean": hu[i],
            "top1_prob_mean": t1[i],
            "top1_agrees_final": ag[i],
            "raw_bytes_per_answer_token": raw_layer,
            "stored_bytes_per_answer_token": (stored_total * raw_layer / raw_total) if stored_total else None,
        })
    return {
        "url": getattr(reader, "url", None),
        "n_samples": n_samples,
        "n_answer_tokens": n_ans,
        "top_k": k,
        "vocab_size": V,
        "value_encoding": fp.value_encoding,
        "targets": fp.targets,
        "layers": names,
        "per_layer": per_layer,
        "raw_bytes_per_answer_token": raw_total if n_ans else None,
        "stored_bytes_per_answer_token": stored_total,
        "bytes_on_disk": nbytes,
    }


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_cache_stats(stats: dict) -> str:
    """The per-layer table as plain text (what ``vlsi-cache stats`` prints)."""
    head = (f"{stats['n_samples']} samples, {stats['n_answer_tokens']} answer tokens, top_k={stats['top_k']}, "
            f"vocab={stats['vocab_size']}, encoding {stats['value_encoding']}, targets {stats.get('targets', 'topk')}")
    cols = f"{'layer':>7}  {'cover':>6}  {'min cov':>7}  {'H lb':>6}  {'H ub':>6}  {'top1 p':>6}  {'=final':>6}  " \
           f"{'raw B':>6}  {'disk B':>7}"
    lines = [head, cols, "-" * len(cols)]
    for r in stats["per_layer"]:
        lines.append(
            f"{r['layer']:>7}  {_f(r['coverage_mean'], '.3f'):>6}  {_f(r['coverage_min'], '.3f'):>7}  "
            f"{_f(r['entropy_lb_mean'], '.3f'):>6}  {_f(r['entropy_ub_mean'], '.3f'):>6}  "
            f"{_f(r['top1_prob_mean'], '.3f'):>6}  {_f(r['top1_agrees_final'], '.3f'):>6}  "
            f"{r['raw_bytes_per_answer_token']:>6}  {_f(r['stored_bytes_per_answer_token'], '.1f'):>7}")
    if stats.get("stored_bytes_per_answer_token") is not None:
        lines.append(f"all layers: {stats['raw_bytes_per_answer_token']:.1f} B raw, "
                     f"{stats['stored_bytes_per_answer_token']:.1f} B on disk per answer token "
                     f"({stats['bytes_on_disk']} bytes in all)")
    if stats.get("stored_bytes_per_answer_token") is not None and stats["layers"]:
        lines.append(f"bytes per row (answer token x layer) on disk: "
                     f"{stats['stored_bytes_per_answer_token'] / len(stats['layers']):.1f}")
    lines.append("cover = top-k mass; H lb/ub = entropy bounds (nats); =final = top-1 agrees with the final head")
    return "\n".join(lines)


def format_kl_vs_reference(d: dict) -> str:
    """The per-layer KL-to-reference table as plain text."""
    lines = [f"KL(reference || cache) per row over {d['n_samples']} shared samples, reference {d['reference']}",
             f"{'layer':>7}  {'mean':>10}  {'p99':>10}  {'max':>10}"]
    for r in d["per_layer"]:
        lines.append(f"{r['layer']:>7}  {_f(r['kl_mean'], '.3e'):>10}  {_f(r['kl_p99'], '.3e'):>10}  "
                     f"{_f(r['kl_max'], '.3e'):>10}")
    lines.append(f"all layers: mean {_f(d['kl_mean'], '.3e')} nats")
    return "\n".join(lines)


def plot_cache_stats(stats: dict, path_png: str | os.PathLike) -> Path:
    """Three panels against layer: top-k coverage (mean and min), entropy bounds, bytes per answer token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats["per_layer"]
    x = np.arange(len(rows))
    names = [r["layer"] for r in rows]

    def col(key):
        return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(x, col("coverage_mean"), "o-", label="mean")
    ax.plot(x, col("coverage_min"), "v:", label="min")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"top-{stats['top_k']} mass covered")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, col("entropy_lb_mean"), "o-", label="lower bound (k + tail bucket)")
    ax.plot(x, col("entropy_ub_mean"), "s--", label="upper bound (tail uniform)")
    ax.set_title("mean entropy (nats)")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar(x - 0.2, col("raw_bytes_per_answer_token"), 0.4, label="raw")
    if rows and rows[0]["stored_bytes_per_answer_token"] is not None:
        ax.bar(x + 0.2, col("stored_bytes_per_answer_token"), 0.4, label="on disk (est.)")
    ax.set_title("bytes per answer token")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, names, rotation=90 if len(names) > 12 else 0)
        ax.set_xlabel("layer")
    fig.suptitle(f"cache stats: {stats.get('url') or ''} ({stats['n_answer_tokens']} answer tokens)", fontsize=10)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- error against a reference cache (vlsi-cache stats --reference) ------------------------------------------------
def _normalised(lp: np.ndarray, tail: np.ndarray):
    """Present-entry probabilities [R, k] and tail mass [R], renormalised to sum to 1 (as the loss does)."""
    p = np.where(np.isfinite(lp), np.exp(lp.astype(np.float64)), 0.0)
    t = tail.astype(np.float64)
    # a tail at the floor (-20, "no tail mass") still gets exp(-20): the uniform reading of a tail needs mass > 0
    m = np.exp(np.maximum(t, -20.0))
    z = p.sum(-1) + m
    return p / z[:, None], m / z


def row_kl(ref_ids, ref_lp, ref_tail, ids, lp, tail, vocab_size: int) -> np.ndarray:
    """Per-row KL(reference || cache) [R] in nats, between two cached distributions of the same rows.

    Both rows are read as full distributions over the vocabulary: their present entries, and their tail mass
    spread uniformly over the tokens they do not list (the maximum-entropy reading of a tail bucket; what a
    student that matches the cache row has no reason to do otherwise than). So an entry the cache dropped costs
    roughly ``p log(p V / m)``: truncation is charged, not hidden in the tail. Inputs: [R, k_ref] / [R, k] ids and
    log-probs (``-inf`` = absent), [R] tails. Rows equal up to renormalisation give 0.
    """
    V = float(vocab_size)
    p, mp = _normalised(ref_lp, ref_tail)
    q, mq = _normalised(lp, tail)
    rp, rq = p > 0, q > 0
    n_p, n_q = rp.sum(-1), rq.sum(-1)
    up = np.where(V > n_p, mp / np.maximum(V - n_p, 1.0), 0.0)  # per unlisted token
    uq = np.where(V > n_q, mq / np.maximum(V - n_q, 1.0), 0.0)
    eq = (np.asarray(ref_ids)[:, :, None] == np.asarray(ids)[:, None, :]) & rp[:, :, None] & rq[:, None, :]
    in_q = eq.any(-1)  # ref entry also listed by the cache
    in_p = eq.any(1)  # cache entry also listed by the reference
    q_at_p = np.where(in_q, (eq * q[:, None, :]).sum(-1), uq[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(rp, p * np.log(p / q_at_p), 0.0).sum(-1)
        # cache-only entries: the reference gives them its uniform tail share
        kl += np.where(rq & ~in_p, up[:, None] * np.log(up[:, None] / q), 0.0).sum(-1)
        n_union = n_p + (rq & ~in_p).sum(-1)
        rest = np.maximum(V - n_union, 0.0)
        kl += np.where((rest > 0) & (up > 0), rest * up * np.log(up / np.maximum(uq, 1e-300)), 0.0)
    return np.nan_to_num(kl, nan=0.0, posinf=np.inf)


def kl_vs_reference(reader, reference, *, limit: int | None = None) -> dict:
    """Mean / p99 / max of :func:`row_kl` (reference || cache) per layer over the samples both caches hold
    (by sample id; layers matched by name, the final head as ``final``). Refuses caches of different
    tokenizers / vocabularies / teachers."""
    from .errors import FingerprintMismatchError

    fa, fb = reference.fingerprint, reader.fingerprint
    for key in ("tokenizer_hash", "vocab_size"):
        if getattr(fa, key) != getattr(fb, key):
            raise FingerprintMismatchError(f"{reader.url}: {key} differs from the reference {reference.url}")
    src_b = fb.derived_from["source_fingerprint"] if fb.derived_from else fb.to_dict()
    src_a = fa.derived_from["source_fingerprint"] if fa.derived_from else fa.to_dict()
    if src_a.get("teacher") != src_b.get("teacher"):
        raise FingerprintMismatchError(f"{reader.url}: teacher differs from the reference {reference.url}")
    names = [n for n in fb.layer_names if n in fa.layer_names]
    ia = [fa.layer_names.index(n) for n in names]
    ib = [fb.layer_names.index(n) for n in names]
    per: list[list[np.ndarray]] = [[] for _ in names]
    n = 0
    for rec in reader.iter():
        if limit is not None and n >= limit:
            break
        if rec.sample_id not in reference:
            continue
        ref = reference.get(rec.sample_id)
        if not np.array_equal(ref.answer_positions, rec.answer_positions):
            raise FingerprintMismatchError(f"{reader.url}: sample {rec.sample_id!r} has other answer positions "
                                           f"than in the reference")
        n += 1
        for j, (a, b) in enumerate(zip(ia, ib)):
            per[j].append(row_kl(ref.topk_ids[:, a], ref.topk_logprobs[:, a], ref.tail_logmass[:, a],
                                 rec.topk_ids[:, b], rec.topk_logprobs[:, b], rec.tail_logmass[:, b], fb.vocab_size))
    out = []
    for name, parts in zip(names, per):
        x = np.concatenate(parts) if parts else np.zeros(0)
        out.append({"layer": name, "kl_mean": float(x.mean()) if x.size else None,
                    "kl_p99": float(np.quantile(x, 0.99)) if x.size else None,
                    "kl_max": float(x.max()) if x.size else None})
    allx = np.concatenate([np.concatenate(p) for p in per if p]) if any(per) else np.zeros(0)
    return {"reference": reference.url, "n_samples": n, "per_layer": out,
            "kl_mean": float(allx.mean()) if allx.size else None}
