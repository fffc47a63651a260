"""Top-k encoding registry (SPEC section 6): how a cache stores its `topk_ids` and `topk_logprobs` arrays.

An encoding maps the decoded record fields (ids int32 [A, L, k] descending log-prob, log-probs float32 [A, L, k],
tail float32 [A, L]) to the stored arrays and back. Every stored array is a plain Zarr v3 integer or float array;
the decode rules are written out in SPEC.md section 6 so a foreign reader can apply them with a few lines of numpy.

Names:

* ``fp16-logprob`` (``exact`` on command lines): ids int32 as they are, log-probs rounded to float16. The v1.0/1.1
  encoding; its decode is the identity on ids and a float32 cast on values.
* ``topk1-<ids>-<values>[-m<eps>|-kl<tau>]`` (format 1.2, required feature ``topk-encodings-v1``):

  - ``<values>``: ``fp16`` (float16 log-probs; an absent entry is ``-inf``), ``q8`` (uint8 codes, step 1/16 nat,
    255 = absent), ``q6`` (uint8 codes 0..63, step 1/4 nat, 63 = absent), ``dq8`` / ``dq6`` (the same codes stored
    as differences along the row). Quantised codes are ``round((lp_top1 - lp) / step)``; the row's offset is not
    stored: the decoder renormalises the kept entries to hold ``1 - exp(tail)`` (the tail is stored exactly).
  - ``<ids>``: ``plain`` (int32 ids, 0 in absent slots), ``sorted`` (kept entries by ascending id as first id +
    gaps; values follow their ids), ``prev`` (layer 0 as ``k + id``; layer ``l > 0`` stores ``r`` when the id is
    entry ``r`` of layer ``l - 1``, else ``k + id``) or ``prevd`` (``prev`` with ``zigzag(r - j)`` and ``2k + id``).
  - ``-m<eps>``: a row keeps its first ``n`` entries, ``n`` the smallest with cumulative probability ``>= 1 - eps``;
    ``-kl<tau>``: the smallest ``n`` whose truncation costs at most ``tau`` nats (``stats.row_kl``'s reading).
    Dropped entries are absent, their mass added to the tail; arrays stay ``[N_ans, L, k]``.

Quantised values drop entries more than (absent code - 1) * step below the row's top-1 (their mass goes to the tail,
like truncation). Decoded absent entries are ``id 0, log-prob -inf``; consumers treat ``-inf`` entries as part of the
tail bucket (vlsi.ops.kl).

Contract of ``encode`` / ``decode``: pure numpy, vectorised over rows (a Python loop over the layer axis at most);
``decode(encode(x))`` is what readers return; copying between caches of one encoding copies stored arrays (never
decode + encode, which could move a truncation boundary).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SchemaError

#: the required feature (SPEC section 3) of every ``topk1-*`` encoding
ENCODINGS_FEATURE = "topk-encodings-v1"
EXACT = "fp16-logprob"
#: command-line aliases -> canonical names
ALIASES = {"exact": EXACT}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ValueEncoding:
    """One way to store top-k ids and log-probs.

    ``encode(ids, logprobs, tail) -> (stored_ids, stored_values, tail)`` and ``decode`` the reverse, on whole
    ``[A, L, k]`` blocks (the tail ``[A, L]`` may change on encode: dropped mass moves there). ``dtype``: stored
    values dtype; ``ids_dtype``: stored ids dtype; ``feature``: the root ``required`` feature a cache with this
    encoding lists (None: readable by every 1.x reader).
    """

    name: str
    dtype: np.dtype
    encode: Callable[..., Arrays]
    decode: Callable[..., Arrays]
    ids_dtype: np.dtype = np.dtype("int32")
    feature: str | None = None
    lossless_ids: bool = True


ENCODINGS: dict[str, ValueEncoding] = {}


def register_encoding(enc: ValueEncoding) -> None:
    if enc.name in ENCODINGS:
        raise ValueError(f"value encoding {enc.name!r} already registered")
    ENCODINGS[enc.name] = enc


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def get_encoding(name: str) -> ValueEncoding:
    name = canonical_name(name)
    enc = ENCODINGS.get(name)
    if enc is None:
        enc = _parse_topk1(name)
        if enc is None:
            raise SchemaError(f"unknown value_encoding {name!r} (known: {', '.join(sorted(ENCODINGS))}, "
                              f"topk1-<plain|sorted|prev|prevd>-<fp16|q8|q6|dq8|dq6>[-m<eps>], no sorted-dq*)")
        ENCODINGS[name] = enc
    return enc


# ---- exact (v1.0) ---------------------------------------------------------------------------------------------------
def _exact_encode(ids, lp, tail, vocab_size=None):
    return np.asarray(ids, np.int32), np.asarray(lp, dtype=np.float32).astype(np.float16), np.asarray(tail, np.float32)


def _exact_decode(ids, vals, tail):
    return np.asarray(ids, np.int32), np.asarray(vals).astype(np.float32), np.asarray(tail, np.float32)


register_encoding(ValueEncoding(EXACT, np.dtype("float16"), _exact_encode, _exact_decode))


# ---- topk1 building blocks ------------------------------------------------------------------------------------------
#: values coding -> (step in nats, absent code); fp16 has no step
QUANT = {"q8": (1.0 / 16.0, 255), "q6": (0.25, 63)}
_NAME = re.compile(r"^topk1-(plain|sorted|prev|prevd)-(fp16|q8|q6|dq8|dq6)(?:-(m|kl)([0-9.]+(?:e-?[0-9]+)?))?$")


def _parse_topk1(name: str) -> ValueEncoding | None:
    m = _NAME.match(name)
    if m is None:
        return None
    ids_c, val_c, rule, eps_s = m.groups()
    if ids_c == "sorted" and val_c.startswith("d"):
        return None  # delta values need the descending order that sorted ids give up
    eps = None
    if eps_s is not None:
        try:
            eps = float(eps_s)
        except ValueError:
            return None
        if not 0 < eps < 1 or not math.isfinite(eps):
            return None
    dtype = np.dtype("float16") if val_c == "fp16" else np.dtype("uint8")

    def encode(ids, lp, tail, vocab_size=None):
        return _encode(np.asarray(ids), np.asarray(lp, np.float32), np.asarray(tail, np.float32), ids_c, val_c,
                       (rule, eps, vocab_size) if eps is not None else None)

    def decode(sids, svals, tail):
        return _decode(np.asarray(sids), np.asarray(svals), np.asarray(tail, np.float32), ids_c, val_c)

    return ValueEncoding(name, dtype, encode, decode, feature=ENCODINGS_FEATURE)


def _encode(ids, lp, tail, ids_c, val_c, eps) -> Arrays:
    lp64 = lp.astype(np.float64)
    p = np.exp(lp64)
    keep = np.isfinite(lp64)
    if eps is not None:
        rule, eps, vocab = eps
        if rule == "m":
            # keep entries while the mass before them is < 1 - eps: the first n with cumsum >= 1 - eps, n >= 1
            before = np.cumsum(p, axis=-1) - p
            keep &= before < 1.0 - eps
        else:
            if vocab is None:
                raise SchemaError("topk1-*-kl<tau> needs the vocabulary size to encode")
            n_keep = _kl_budget_n(np.where(keep, p, 0.0), tail, eps, float(vocab))
            keep &= np.arange(lp64.shape[-1]) < n_keep[..., None]
        keep[..., 0] = np.isfinite(lp64[..., 0])
    if val_c.lstrip("d") in QUANT:
        step, absent = QUANT[val_c.lstrip("d")]
        codes = np.rint((lp64[..., :1] - lp64) / step)
        keep &= codes < absent
        if val_c.startswith("d"):
            # deltas along the row: present entries are a prefix (descending order), codes non-decreasing
            c = np.where(keep, codes, 0.0)
            d = c - np.concatenate([np.zeros_like(c[..., :1]), c[..., :-1]], axis=-1)
            if np.any(d[keep] < 0):
                raise SchemaError(f"topk1-*-{val_c}: log-probs must be in descending order along k")
            codes = d
        vals = np.where(keep, codes, absent).astype(np.uint8)
    else:
        vals = np.where(keep, lp, -np.inf).astype(np.float16)
    dropped = np.where(keep, 0.0, np.nan_to_num(p, nan=0.0)).sum(-1)
    # the tail keeps its stored fp32 value bit for bit unless mass moved into it
    moved = np.log(np.exp(tail.astype(np.float64)) + dropped)
    new_tail = np.where(dropped > 0, np.minimum(moved, 0.0), tail).astype(np.float32)
    ids = ids.astype(np.int64)
    k = ids.shape[-1]
    if ids_c == "plain":
        sids = np.where(keep, ids, 0)
    elif ids_c == "sorted":
        # kept entries by ascending id, absent ones last; values travel with their ids
        key = np.where(keep, ids, np.int64(1) << 40)
        order = np.argsort(key, axis=-1, kind="stable")
        sid = np.take_along_axis(key, order, -1)
        vals = np.take_along_axis(vals, order, -1)
        kept = np.take_along_axis(keep, order, -1)
        gaps = np.diff(sid, axis=-1, prepend=0)
        sids = np.where(kept, gaps, 0)
    else:  # prev / prevd
        new = k if ids_c == "prev" else 2 * k  # codes below `new` point into the previous layer's row
        sids = np.where(keep, ids + new, 0)
        j = np.arange(k)
        for layer in range(1, ids.shape[1]):
            prev, prev_keep = ids[:, layer - 1], keep[:, layer - 1]
            # [A, k, k] equality: entry j of this layer == entry r of the previous one (kept ones only)
            eq = (ids[:, layer, :, None] == prev[:, None, :]) & prev_keep[:, None, :]
            hit = eq.any(-1) & keep[:, layer]
            r = eq.argmax(-1)
            if ids_c == "prevd":  # rank-order delta, zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
                dr = r - j
                r = np.where(dr >= 0, 2 * dr, -2 * dr - 1)
            sids[:, layer] = np.where(hit, r, sids[:, layer])
    return sids.astype(np.int32), vals, new_tail


def _kl_budget_n(p: np.ndarray, tail: np.ndarray, tau: float, vocab: float) -> np.ndarray:
    """Per row the smallest n >= 1 whose truncation costs KL <= tau: KL(P || Q_n), P the row with its tail spread
    uniformly over the V - k unlisted tokens, Q_n its first n entries with the rest (tail + dropped) spread over
    V - n (the reading of ``vlsi.cache_format.stats.row_kl``). Decoding does not depend on this rule."""
    k = p.shape[-1]
    m = np.exp(np.maximum(tail.astype(np.float64), -20.0))[..., None]  # a floored tail still spreads e^-20
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        # suffix sums over j >= n for n = 0..k-1 (index n)
        S = np.cumsum(p[..., ::-1], axis=-1)[..., ::-1]
        T = np.cumsum(plogp[..., ::-1], axis=-1)[..., ::-1]
        n = np.arange(k, dtype=np.float64)
        u2 = (m + S) / (vocab - n)
        u = m / (vocab - k)
        kl = T - S * np.log(u2) + m * (np.log(u) - np.log(u2))
    kl = np.where(np.isfinite(kl), kl, np.inf)
    ok = kl <= tau
    ok[..., 0] = False  # keep at least one entry
    # smallest n in 1..k-1 with kl <= tau, else k
    first = np.where(ok.any(-1), ok.argmax(-1), k)
    return np.maximum(first, 1)


_TABLES: dict = {}


def _tables(step: float, absent: int, size: int = 256):
    """(relative log-prob, its exp) per code ``0 .. size - 1``, float32; codes ``>= absent`` -> (-inf, 0). Delta
    codes sum to at most ``k * (absent - 1)``, so their tables are larger (no clip needed on decode)."""
    key = (step, absent, size)
    if key not in _TABLES:
        c = np.arange(size, dtype=np.float64)
        rel = np.where(c < absent, -c * step, -np.inf)
        _TABLES[key] = (rel.astype(np.float32), np.exp(rel).astype(np.float32))
    return _TABLES[key]


def _decode(sids, vals, tail, ids_c, val_c) -> Arrays:
    k = sids.shape[-1]
    if val_c.lstrip("d") in QUANT:
        step, absent = QUANT[val_c.lstrip("d")]
        valid = vals != absent
        if val_c.startswith("d"):
            # present entries are a prefix: the running sum of the deltas; absent slots -> a code past the table's
            # finite part (one putmask, no clip: sums stay below k * absent)
            codes = np.cumsum(np.where(valid, vals, 0), axis=-1, dtype=np.int32)
            size = k * absent + 1
            np.putmask(codes, ~valid, size - 1)
        else:
            codes, size = vals, 256
        rel_t, exp_t = _tables(step, absent, size)
        # float32 through lookup tables (no exp per entry): the absent code maps to -inf / 0
        e = exp_t.take(codes)
        # renormalise the kept entries to hold 1 - exp(tail); tails <= -20 mean "no tail mass" (SPEC section 5)
        t32 = tail.astype(np.float32)
        with np.errstate(divide="ignore"):
            head = np.where(t32 <= -20.0, np.float32(0.0), np.log(-np.expm1(np.minimum(t32, np.float32(-1e-7)))))
            shift = (head - np.log(e.sum(-1))).astype(np.float32)
        lp = rel_t.take(codes)
        lp += shift[..., None]
    else:
        lp = vals.astype(np.float32)
        valid = np.isfinite(lp)
    if ids_c == "plain":
        ids = np.where(valid, sids, 0)
    elif ids_c == "sorted":
        ids = np.where(valid, np.cumsum(np.where(valid, sids, 0), axis=-1), 0)
        # back to descending log-prob (ties: ascending id, the stored order); absent entries last
        order = np.argsort(-np.where(valid, lp, -np.inf), axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, -1)
        lp = np.take_along_axis(lp, order, -1)
    else:  # prev / prevd
        ids = _decode_prev_ids(sids, valid, k if ids_c == "prev" else 2 * k, ids_c == "prevd")
    return ids.astype(np.int32, copy=False), lp, tail.astype(np.float32)


def _decode_prev_ids(sids, valid, new: int, zigzag: bool) -> np.ndarray:
    """Ids of a ``prev`` / ``prevd`` block [A, L, k]: codes ``>= new`` are ``new + id``; smaller ones point at an
    entry of the previous layer's decoded row (``prevd``: a zigzag rank delta). Layers decode in order (each points
    into the one before), over layer-major copies so every step is one flat ``take`` over all rows."""
    A, L, k = sids.shape
    s32 = np.ascontiguousarray(sids.transpose(1, 0, 2), dtype=np.int32)  # [L, A, k]
    vt = np.ascontiguousarray(valid.transpose(1, 0, 2))
    ptr = ~vt | (s32 >= new)  # True: the slot holds its own id (fresh, or absent -> 0)
    np.logical_not(ptr, out=ptr)  # True: the slot points into the previous layer
    ids = np.where(vt & ~ptr, s32 - new, 0)  # [L, A, k]; absent slots decode to 0
    if zigzag:  # un-zigzag the rank delta: 0, 1, 2, 3, ... -> 0, -1, 1, -2, ...
        r = np.arange(k, dtype=np.int32) + ((s32 >> 1) ^ -(s32 & 1))
    else:
        r = s32.copy()  # s32 may be the caller's array (ascontiguousarray does not copy a contiguous int32 block)
    np.clip(r, 0, k - 1, out=r)
    r += (np.arange(A, dtype=np.int32) * k)[None, :, None]  # flat index into a layer's [A * k]
    for layer in range(1, L):  # sequential: each layer points into the previous decoded one
        p = ptr[layer]
        if p.any():
            ids[layer][p] = ids[layer - 1].reshape(-1).take(r[layer][p])
    return ids.transpose(1, 0, 2)


def encoding_names_for_docs() -> list[str]:
    """A representative set of encoding names (benchmarks, golden fixtures)."""
    return [EXACT, "topk1-plain-q8", "topk1-sorted-q8", "topk1-prev-q8", "topk1-prev-q6", "topk1-prev-q8-m1e-3",
            "topk1-sorted-fp16-m1e-3"]
