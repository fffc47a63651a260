"""Per-layer profile of a teacher cache, and the synthetic 152k-vocab rows generated from one.

*Profile* (``measure_profile``): per layer row of a cache (target layers ascending, then ``final``), over every
answer position:

* ``depth``: where the row sits in the teacher, ``(i + 1) / (n_layers + 1)`` for decoder layer ``i`` (0-based) of
  ``n_layers``, 1.0 for the final head (the head is one step past the last layer);
* ``top1_q``: quantiles (``QUANTILES``) of the top-1 probability;
* ``coverage_q``: quantiles of the top-k mass ``1 - exp(tail)``;
* ``cum4_p50`` / ``cum16_p50``: median cumulative mass of the first 4 / 16 entries;
* ``entropy_lb``: mean entropy of the k entries + one tail bucket (``vlsi.cache_format.stats``' lower bound);
* ``overlap_prev``: mean fraction of the row's top-k ids that the previous row (same position) also lists
  (None for the first row).

*Generator* (``synthetic_rows``): per answer position a pool of 256 candidate ids (Zipf-like, frequent tokens have
small ids) and per row logits over the pool ``beta(d) * z(d)``, ``z(d) = base + s * W(d)`` with ``W`` a Brownian
motion in depth (adjacent rows share most of their top-k; the share falls with the depth gap) and the rest of the
vocabulary holding a tail mass. Two regimes:

* ``flat`` (``profile=None``): round 1's generator, unchanged: sharpness and tail mass fixed ramps in depth
  (average top-64 mass 0.85, so rows are flat: every entry matters);
* a measured profile (``fit_profile(measure_profile(cache))``): the tail mass of each row is drawn from the
  measured coverage quantiles (piecewise-linear inverse CDF) at its depth; ``beta`` at each measured depth is
  fitted (bisection) so the generated median top-1 probability equals the measured one; ``s`` is fitted so the
  generated mean adjacent-row overlap, at the measured rows' depth gaps, equals the measured mean. Depths between
  measured rows interpolate linearly; depths below the shallowest measured row use its parameters. Nothing is
  fitted to bytes or KL: those are outputs.
"""
from __future__ import annotations

import numpy as np

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
POOL = 256


def _depths(layer_names, n_layers: int) -> list[float]:
    return [1.0 if n == "final" else (int(n) + 1) / (n_layers + 1) for n in layer_names]


def measure_profile(reader) -> dict:
    """The per-layer profile (module doc) of a top-k cache ``reader``."""
    fp = reader.fingerprint
    L, k = fp.n_layers, fp.top_k
    n_dec = int((fp.teacher or {}).get("num_layers") or (max(fp.target_layers) + 1))
    top1, cov, c4, c16, ent = ([[] for _ in range(L)] for _ in range(5))
    ov_sum, ov_n = np.zeros(L), 0
    for rec in reader.iter():
        lp = np.asarray(rec.topk_logprobs, np.float64)
        if not lp.shape[0]:
            continue
        p = np.exp(lp)
        m = np.exp(np.asarray(rec.tail_logmass, np.float64))
        cs = np.cumsum(p, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1) - np.where(m > 0, m * np.log(m), 0)
        ids = np.asarray(rec.topk_ids)
        for j in range(L):
            top1[j].append(p[:, j, 0])
            cov[j].append(1 - m[:, j])
            ent[j].append(h[:, j])
            c4[j].append(cs[:, j, min(3, k - 1)])
            c16[j].append(cs[:, j, min(15, k - 1)])
        fin = np.isfinite(lp)
        for j in range(1, L):
            same = ((ids[:, j, :, None] == ids[:, j - 1, None, :]) & fin[:, j - 1, None, :]).any(-1) & fin[:, j]
            ov_sum[j] += (same.sum(-1) / np.maximum(fin[:, j].sum(-1), 1)).sum()
        ov_n += lp.shape[0]
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    depth = _depths(fp.layer_names, n_dec)
    rows = []
    for j, name in enumerate(fp.layer_names):
        rows.append({"layer": name, "depth": depth[j],
                     "top1_q": np.quantile(cat(top1[j]), QUANTILES).tolist(),
                     "coverage_q": np.quantile(cat(cov[j]), QUANTILES).tolist(),
                     "cum4_p50": float(np.median(cat(c4[j]))), "cum16_p50": float(np.median(cat(c16[j]))),
                     "entropy_lb": float(cat(ent[j]).mean()),
                     "overlap_prev": float(ov_sum[j] / ov_n) if j else None})
    return {"source": getattr(reader, "url", None), "top_k": k, "vocab_size": fp.vocab_size,
            "n_answer_tokens": reader.n_answer_tokens, "quantiles": list(QUANTILES), "layers": rows}


# ---- generator ------------------------------------------------------------------------------------------------------
def _pool_ids(rng, A: int, vocab: int) -> np.ndarray:
    ids = np.empty((A, POOL), np.int64)
    for a in range(A):
        # Zipf-like distinct ids: frequent tokens (small ids) dominate
        cand = np.unique((rng.zipf(1.2, size=POOL * 4) - 1 + rng.integers(0, 2000)) % vocab)
        extra = rng.choice(vocab, POOL, replace=False)
        ids[a] = np.concatenate([rng.permutation(cand), extra[~np.isin(extra, cand)]])[:POOL]
    return ids


def _flat_logits(rng, A: int, L: int):
    base = rng.standard_normal((A, 1, POOL))
    # layer-to-layer drift: a random walk, so adjacent layers keep most of their top-k
    walk = np.cumsum(rng.standard_normal((A, L, POOL)) * 0.25, axis=1)
    depth = np.linspace(0.0, 1.0, L)[None, :, None]
    sharp = 0.9 + 2.6 * depth * rng.uniform(0.7, 1.3, (A, 1, 1))  # shallow flat, deep peaked
    z = sharp * (base + walk * (1.2 - depth))
    tail_mass = np.clip(rng.beta(1.2, 12.0, (A, L)) * (1.1 - depth[..., 0]), 1e-6, 0.6)
    return z, tail_mass


def _interp(d, xs, ys):
    """Per depth in ``d`` the piecewise-linear interpolation of ``ys`` (one value or vector per x) over ``xs``."""
    ys = np.asarray(ys, np.float64)
    if ys.ndim == 1:
        return np.interp(d, xs, ys)
    return np.stack([np.interp(d, xs, ys[:, q]) for q in range(ys.shape[1])], -1)


def _profile_logits(rng, A: int, depths, fit: dict):
    """Logits [A, L, POOL] and tail masses [A, L] at ``depths`` under the fitted profile ``fit``."""
    d = np.asarray(depths, np.float64)
    xs = fit["depth"]
    qs = np.asarray(fit["quantiles"])
    betaq = np.asarray(_interp(d, xs, fit["beta"]), np.float64).reshape(len(d), -1)  # [L, Q] or [L, 1]
    covq = _interp(d, xs, fit["coverage_q"])  # [L, Q]
    # one draw per answer position, shared by its rows: a position peaked at one layer is peaked at all
    ub = rng.uniform(size=A)
    beta = betaq[None, :, 0] if betaq.shape[1] == 1 else \
        np.stack([np.interp(ub, qs, betaq[j]) for j in range(len(d))], -1)  # [A, L]
    base = rng.standard_normal((A, 1, POOL))
    # Brownian motion in depth from depth 0: increments ~ N(0, s^2 * gap)
    gaps = np.diff(np.concatenate([[0.0], d]))
    walk = np.cumsum(rng.standard_normal((A, len(d), POOL)) * np.sqrt(np.maximum(gaps, 0))[None, :, None], axis=1)
    z = beta[..., None] * (base + fit["walk"] * walk)
    u = rng.uniform(size=(A, len(d)))
    cov = np.stack([np.interp(u[:, j], qs, covq[j]) for j in range(len(d))], -1)
    return z, np.clip(1.0 - cov, 1e-6, 0.999)


def synthetic_rows(rng, A: int, L: int, vocab: int, profile: dict | None = None):
    """Full distributions of A answer positions x L rows (L - 1 target layers of an (L-1)-layer teacher + final),
    as (pool ids [A, POOL], pool log-probs [A, L, POOL], tail log-mass [A, L]); the tail is spread uniformly over
    the other vocab - POOL tokens. ``profile``: None (flat) or a ``fit_profile`` result (module doc)."""
    ids = _pool_ids(rng, A, vocab)
    if profile is None:
        z, tail_mass = _flat_logits(rng, A, L)
    else:
        z, tail_mass = _profile_logits(rng, A, [(i + 1) / L for i in range(L - 1)] + [1.0], profile)
    lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    lp = lp + np.log1p(-tail_mass)[..., None]
    return ids, lp, np.log(tail_mass)


def _gen_stats(rng, fit, depths, k: int, A: int = 600, q=None):
    z, tm = _profile_logits(rng, A, depths, fit)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * (1 - tm)[..., None]
    top = np.argsort(-p, -1)[..., :k]
    t1 = np.take_along_axis(p, top[..., :1], -1)[..., 0]
    top1 = np.median(t1, 0) if q is None else np.quantile(t1, q, axis=0).T  # [L] or [L, Q]
    ov = [float(((top[:, j, :, None] == top[:, j - 1, None, :]).any(-1)).mean()) for j in range(1, len(depths))]
    return top1, ov


def fit_profile(measured: dict, *, k: int = 64, seed: int = 0) -> dict:
    """Generator parameters fitted to ``measured`` (module doc): ``beta[depth][quantile]`` and one walk scale."""
    rows = measured["layers"]
    depth = [r["depth"] for r in rows]
    Q = len(measured["quantiles"])
    target_q = np.array([r["top1_q"] for r in rows])  # [L, Q]
    target_ov = float(np.mean([r["overlap_prev"] for r in rows[1:]])) if len(rows) > 1 else None
    fit = {"depth": depth, "quantiles": measured["quantiles"], "coverage_q": [r["coverage_q"] for r in rows],
           "beta": [[2.0] * Q for _ in rows], "walk": 1.0}
    for _ in range(2):  # alternate: beta per (depth, quantile), then the walk scale (mean overlap)
        lo, hi = np.full((len(rows), Q), 0.05), np.full((len(rows), Q), 60.0)
        for _ in range(20):
            mid = np.sqrt(lo * hi)
            for qi in range(Q):  # a constant beta whose median top-1 is the measured quantile qi
                t1, _ = _gen_stats(np.random.default_rng(seed), {**fit, "beta": mid[:, qi:qi + 1].tolist()}, depth, k,
                                   A=300)
                below = t1 < target_q[:, qi]
                lo[:, qi], hi[:, qi] = np.where(below, mid[:, qi], lo[:, qi]), np.where(below, hi[:, qi], mid[:, qi])
        fit["beta"] = np.maximum.accumulate(np.sqrt(lo * hi), axis=1).tolist()  # monotone in the quantile
        if target_ov is None:
            break
        lo_s, hi_s = 0.01, 20.0
        for _ in range(18):
            mid = float(np.sqrt(lo_s * hi_s))
            _, ov = _gen_stats(np.random.default_rng(seed), {**fit, "walk": mid}, depth, k)
            lo_s, hi_s = (mid, hi_s) if np.mean(ov) > target_ov else (lo_s, mid)
        fit["walk"] = float(np.sqrt(lo_s * hi_s))
    t1, ov = _gen_stats(np.random.default_rng(seed + 1), fit, depth, k, q=measured["quantiles"])
    fit["check"] = {"top1_q_measured": target_q.tolist(), "top1_q_generated": np.asarray(t1).tolist(),
                    "overlap_measured": [r["overlap_prev"] for r in rows[1:]], "overlap_generated": ov}
    return fit
