"""Adaptive layer matching (VLsI Alg. 1) and every ablation variant of docs/method.md "Adaptive layer matching",
as pure functions.

Input: a ``[ts, tl]`` matrix ``kl[i, j]`` = mean KL(P_teacher[j] || P_student[i]) over a batch's answer tokens
(indices over the TARGET LISTS, not decoder-layer ids; computed without grad). Output: which teacher target each
student target is distilled from. Pure: no model, no autograd; randomness only from the given ``torch.Generator``
(checkpointed by the loop, so a resumed run draws the same indices).

Alg. 1 (paper), with the switches of the ablations (paper Table 4e)::

    start = 0
    for i in 0 .. ts-1:
        cand = start .. tl - ts + i        # range (--match-range): leave room for the remaining student layers
        T = adaptive temperature of kl[i, cand]
        j_i = sample softmax(-kl[i, cand] / T)   # --match multinomial
        start = j_i + 1                    # order (--match-order): the next match is strictly deeper

Candidate sets (``candidates``):

- range and order: ``start .. tl - ts + i`` (never empty when ``tl >= ts``; picks strictly increasing).
- range, no order: ``0 .. tl - ts + i`` (start stays 0).
- order, no range: ``start .. tl - 1``; when ``start == tl`` (earlier picks used up the teacher) the set is
  ``{tl - 1}`` - the only way to keep every student layer matched without the range's look-ahead
  (so picks are then non-decreasing, not strictly increasing).
- neither: ``0 .. tl - 1``.

Selection rules (``--match``):

- ``multinomial`` (paper): sample from ``softmax(-kl / T)`` over the candidates;
- ``argmin``: the lowest-KL candidate (the ``T -> 0`` limit);
- ``random``: uniform over the candidates (paper's "random index" ablation: use with no range/order);
- ``uniform``: fixed ``j = i * floor(tl / ts)`` (no KL used; range/order flags do not apply);
- ``bottom-k``: the ``match_k`` lowest-KL candidates, averaged (weights ``1/k``); for order, the next
  candidate set starts after the lowest-KL one (so ``bottom-k`` with k = 1 is ``argmin``).

Adaptive temperature (``--adaptive-temp``; the paper's line is garbled, both readings are supported):
``scale-over-range``: ``T = scale / (max - min + eps)`` (as printed, default), ``range-over-scale``:
``T = (max - min + eps) / scale``, ``off``: ``T = 1``. ``eps = 1e-6``, ``scale = 2`` (``--match-scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import ADAPTIVE_TEMPS, MATCH_RULES

EPS = 1e-6

__all__ = ["MATCH_RULES", "ADAPTIVE_TEMPS", "Matching", "candidates", "temperature", "selection_probs", "match_layers"]


@dataclass(frozen=True)
class Matching:
    """Result of one matching: for each student target ``i``, teacher target indices and their loss weights.

    ``matched[i]`` is the primary index (the sampled / chosen one; for bottom-k the lowest-KL one): this is
    what ``metrics.jsonl`` logs. ``indices[i]`` / ``weights[i]`` are what the loss uses (one index, weight 1,
    for every rule but bottom-k).
    """

    matched: tuple[int, ...]
    indices: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]


def candidates(i: int, start: int, ts: int, tl: int, *, use_range: bool, use_order: bool) -> list[int]:
    """Teacher indices student target ``i`` may match, given the running ``start`` (see module doc)."""
    lo = start if use_order else 0
    hi = (tl - ts + i) if use_range else (tl - 1)
    if lo > hi:  # only reachable with order and no range: earlier picks used up the deeper teacher layers
        return [tl - 1]
    return list(range(lo, hi + 1))


def temperature(kl_row: torch.Tensor, *, adaptive: str, scale: float) -> float:
    """Softmax temperature for one candidate row of KL values (see module doc)."""
    if adaptive == "off":
        return 1.0
    spread = float(kl_row.max() - kl_row.min()) + EPS
    if adaptive == "scale-over-range":
        return scale / spread
    if adaptive == "range-over-scale":
        return spread / scale
    raise ValueError(f"adaptive_temp={adaptive!r} is not one of {ADAPTIVE_TEMPS}")


def selection_probs(kl_row: torch.Tensor, *, adaptive: str, scale: float) -> torch.Tensor:
    """``softmax(-kl / T)`` over one candidate row, float64 (the multinomial rule's distribution)."""
    kl64 = kl_row.detach().to(torch.float64)
    t = temperature(kl64, adaptive=adaptive, scale=scale)
    return torch.softmax(-kl64 / t, dim=0)


def match_layers(
    kl: torch.Tensor,
    *,
    rule: str = "multinomial",
    use_range: bool = True,
    use_order: bool = True,
    adaptive: str = "scale-over-range",
    scale: float = 2.0,
    k: int = 2,
    generator: torch.Generator | None = None,
) -> Matching:
    """Match every student target to teacher target(s) from the ``[ts, tl]`` KL matrix ``kl``.

    ``kl`` may be ``None``-free only: for ``rule="uniform"`` its values are ignored but its shape is used.
    Raises ``ValueError`` when ``tl < ts`` with the range constraint (Alg. 1 needs a teacher target per
    student target), or for unknown rules. Deterministic for a given ``generator`` state.
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"match rule {rule!r} is not one of {MATCH_RULES}")
    if adaptive not in ADAPTIVE_TEMPS:
        raise ValueError(f"adaptive_temp={adaptive!r} is not one of {ADAPTIVE_TEMPS}")
    if kl.dim() != 2:
        raise ValueError(f"kl must be a [ts, tl] matrix, got shape {tuple(kl.shape)}")
    ts, tl = kl.shape
    if ts == 0:
        return Matching((), (), ())
    if tl < ts and (use_range or rule == "uniform"):
        raise ValueError(f"layer matching needs at least as many teacher targets ({tl}) as student targets ({ts})")
    if rule == "uniform":
        step = tl // ts
        picks = tuple(i * step for i in range(ts))
        return Matching(picks, tuple((j,) for j in picks), tuple((1.0,) for _ in picks))

    kl = kl.detach().to(torch.float64).cpu()
    matched, indices, weights = [], [], []
    start = 0
    for i in range(ts):
        cand = candidates(i, start, ts, tl, use_range=use_range, use_order=use_order)
        row = kl[i, cand]
        if rule == "multinomial":
            p = selection_probs(row, adaptive=adaptive, scale=scale)
            pos = int(torch.multinomial(p, 1, generator=generator))
            sel = (cand[pos],)
        elif rule == "random":
            pos = int(torch.randint(len(cand), (1,), generator=generator))
            sel = (cand[pos],)
        elif rule == "argmin":
            sel = (cand[int(torch.argmin(row))],)
        else:  # bottom-k; stable sort so ties resolve to the shallower layer, as argmin does
            order = torch.sort(row, stable=True).indices[: max(1, min(k, len(cand)))]
            sel = tuple(cand[int(o)] for o in order)
        matched.append(sel[0])
        indices.append(sel)
        weights.append(tuple(1.0 / len(sel) for _ in sel))
        start = sel[0] + 1
    return Matching(tuple(matched), tuple(indices), tuple(weights))
