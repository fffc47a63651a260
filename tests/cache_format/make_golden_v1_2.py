"""Generate the golden v1.2 fixtures (tests/cache_format/golden/v1_2). Run ONCE per format version:

    python tests/cache_format/make_golden_v1_2.py tests/cache_format/golden/v1_2

One small cache per ``topk1-*`` encoding (``ENCODED``) holding the v1.0 fixture's six samples, and one sampled-targets
cache (``SAMPLED``), plus ``expected.npz``: for every cache and sample, the stored arrays and what a reader must
decode them to, written at generation time. test_cache_golden_v1_2.py checks that every later reader returns exactly
these decoded values, and (with tensorstore, an independent Zarr v3 reader) that the stored arrays decode to them by
the rules of SPEC section 6 written out again in the test. Do not change this generator; a new version gets a new
generator and fixture.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from make_golden import golden_arrays, golden_fingerprint_dict

ENCODED = ("topk1-plain-q8", "topk1-sorted-q8", "topk1-prev-q8", "topk1-prevd-dq8", "topk1-prev-q6-m1e-3",
           "topk1-sorted-fp16-m1e-2", "topk1-prevd-dq6-kl1e-2")
SAMPLED = "sampled-prevd-dq8"
SAMPLES_PER_ROW = 12
PART = "p0000of0001-golden000000"


def sampled_arrays(seed: int = 7) -> list[dict]:
    """The golden samples as sampled targets: 12 draws per row from the row's k + tail distribution (a tail draw
    is dropped from the stored ids: it is tail mass), distinct ids sorted by descending log-prob, with counts."""
    from make_golden import K

    rng = np.random.default_rng(seed)
    out = []
    for d in golden_arrays():
        lp, ids, tail = d["topk_logprobs"], d["topk_ids"], d["tail_logmass"]
        A, L, _ = lp.shape
        s_ids = np.zeros((A, L, K), np.int32)
        s_lp = np.full((A, L, K), -np.inf, np.float32)
        counts = np.zeros((A, L, K), np.int32)
        s_tail = np.zeros((A, L), np.float32)
        for a in range(A):
            for layer in range(L):
                p = np.append(np.exp(lp[a, layer].astype(np.float64)), np.exp(float(tail[a, layer])))
                c = rng.multinomial(SAMPLES_PER_ROW, p / p.sum())[:K]
                # draws that landed in the tail are given back to the most probable id (the fixture needs
                # counts summing to samples_per_row; the extractor never draws outside stored ids)
                c[0] += SAMPLES_PER_ROW - c.sum()
                keep = np.flatnonzero(c)
                n = len(keep)
                s_ids[a, layer, :n] = ids[a, layer, keep]
                s_lp[a, layer, :n] = lp[a, layer, keep]
                counts[a, layer, :n] = c[keep]
                s_tail[a, layer] = np.log1p(-np.exp(lp[a, layer, keep].astype(np.float64)).sum())
        out.append({**d, "topk_ids": s_ids, "topk_logprobs": s_lp, "tail_logmass": s_tail, "sample_counts": counts})
    return out


def main(dest: str) -> None:
    from vlsi.cache_format import CacheWriter, Fingerprint, SampleRecord, open_cache

    expected = {}
    for enc in ENCODED + (SAMPLED,):
        fpd = dict(golden_fingerprint_dict(), created_at="2026-12-01T00:00:00+00:00", tool_version="0.2.0")
        if enc == SAMPLED:
            fpd.update(value_encoding="topk1-prevd-dq8", targets="sampled", samples_per_row=SAMPLES_PER_ROW)
            arrays = sampled_arrays()
        else:
            fpd["value_encoding"] = enc
            arrays = golden_arrays()
        url = os.path.join(dest, enc)
        with CacheWriter(url, Fingerprint.from_dict(fpd), part=PART, chunk_bytes=256) as w:  # one segment
            for d in arrays:
                w.append(SampleRecord(**d))
        rd = open_cache(url)
        for d in arrays:
            raw, dec = rd.get(d["sample_id"], decode=False), rd.get(d["sample_id"])
            key = f"{enc}/{d['sample_id']}"
            for f in ("topk_ids", "topk_logprobs", "tail_logmass"):
                expected[f"{key}/stored_{f}"] = getattr(raw, f)
                expected[f"{key}/{f}"] = getattr(dec, f)
            if dec.sample_counts is not None:
                expected[f"{key}/sample_counts"] = dec.sample_counts
    np.savez_compressed(os.path.join(dest, "expected.npz"), **expected)


if __name__ == "__main__":
    main(sys.argv[1])
