"""The committed golden v1.2 caches (one per topk1-* encoding, one with sampled targets) must be read by every later
version with exactly the values recorded at generation time (expected.npz; see make_golden_v1_2.py); their stored
arrays, read by tensorstore, must decode to them by SPEC section 6's rules (re-implemented here from the spec text);
and a 1.1 reader must refuse them by feature name."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from make_golden import N_SAMPLES, golden_arrays
from make_golden_v1_2 import ENCODED, SAMPLED, SAMPLES_PER_ROW

from vlsi.cache_format import layout, open_cache, verify_cache
from vlsi.cache_format.errors import VersionError
from vlsi.cache_format.migrations import check_and_migrate

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "v1_2")
ALL = ENCODED + (SAMPLED,)


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(GOLDEN, "expected.npz")) as z:
        return dict(z)


@pytest.mark.parametrize("name", ALL)
def test_golden_v1_2_reads_exactly(name, expected):
    rd = open_cache(os.path.join(GOLDEN, name))
    assert rd.attrs["format_version"] == [1, 2] and len(rd) == N_SAMPLES
    want_req = ["csr-segments-v1", "sample-tables-v1", "topk-encodings-v1"] + \
        (["sampled-targets-v1"] if name == SAMPLED else [])
    assert rd.attrs["required"] == want_req
    src = {d["sample_id"]: d for d in golden_arrays()}
    for got in rd.iter():
        key = f"{name}/{got.sample_id}"
        np.testing.assert_array_equal(got.input_ids, src[got.sample_id]["input_ids"])
        for f in ("topk_ids", "tail_logmass"):
            np.testing.assert_array_equal(getattr(got, f), expected[f"{key}/{f}"], err_msg=f"{key} {f}")
        # decoded log-probs: float32 results of float32 or float64 arithmetic (SPEC section 6 fixes the rule)
        np.testing.assert_allclose(got.topk_logprobs, expected[f"{key}/topk_logprobs"], rtol=0, atol=1e-6)
        assert (np.isfinite(got.topk_logprobs) == np.isfinite(expected[f"{key}/topk_logprobs"])).all()
        raw = rd.get(got.sample_id, decode=False)
        for f in ("topk_ids", "topk_logprobs", "tail_logmass"):
            np.testing.assert_array_equal(getattr(raw, f), expected[f"{key}/stored_{f}"], err_msg=f"{key} {f}")
        if name == SAMPLED:
            np.testing.assert_array_equal(got.sample_counts, expected[f"{key}/sample_counts"])
            assert got.sample_counts.shape == got.topk_ids.shape
            if got.sample_counts.size:
                assert (got.sample_counts.sum(-1) == SAMPLES_PER_ROW).all()
        else:
            assert got.sample_counts is None
    assert verify_cache(os.path.join(GOLDEN, name)).ok


def test_golden_v1_2_values_are_close_to_the_source(expected):
    """Decoded values stay within each encoding's documented error of the fp32 source log-probs."""
    tol = {"q8": 1 / 32 + 2e-3, "q6": 1 / 8 + 2e-3, "fp16": 1e-2}
    for name in ENCODED:
        vc = name.split("-")[2].lstrip("d")
        for d in golden_arrays():
            key = f"{name}/{d['sample_id']}"
            ids, lp = expected[f"{key}/topk_ids"], expected[f"{key}/topk_logprobs"]
            for a in range(ids.shape[0]):
                for layer in range(ids.shape[1]):
                    src = dict(zip(d["topk_ids"][a, layer].tolist(), d["topk_logprobs"][a, layer].tolist()))
                    kept = np.isfinite(lp[a, layer])
                    assert kept[0], key
                    for i, v in zip(ids[a, layer][kept], lp[a, layer][kept]):
                        # quantised values are renormalised: compare relative to the row's top-1
                        if vc == "fp16":
                            assert abs(v - src[int(i)]) < tol[vc]
                    rel = lp[a, layer][kept] - lp[a, layer][0]
                    rel_src = np.array([src[int(i)] for i in ids[a, layer][kept]]) - src[int(ids[a, layer][0])]
                    assert np.abs(rel - rel_src).max() < 2 * tol[vc], key


def test_a_1_1_reader_refuses_by_feature_name(monkeypatch):
    import vlsi.cache_format.migrations as mig

    monkeypatch.setattr(mig, "KNOWN_FEATURES", frozenset({"csr-segments-v1", "sample-tables-v1"}))
    monkeypatch.setattr(mig, "FORMAT_VERSION", (1, 1))
    attrs = json.load(open(os.path.join(GOLDEN, SAMPLED, "zarr.json")))["attributes"]["vlsi_cache"]
    with pytest.raises(VersionError, match=r"does not know: \['sampled-targets-v1', 'topk-encodings-v1'\]"):
        check_and_migrate(attrs, "golden")


# ---- an independent decoder, written from SPEC section 6 -----------------------------------------------------------
def spec_decode(name: str, sids: np.ndarray, vals: np.ndarray, tail: np.ndarray):
    _, ids_c, val_c = name.split("-")[:3]  # the truncation suffix does not change decoding
    k = sids.shape[-1]
    A, L, _ = sids.shape
    ids = np.zeros((A, L, k), np.int64)
    lp = np.full((A, L, k), -np.inf)
    for a in range(A):
        for layer in range(L):
            s, v, t = sids[a, layer].astype(np.int64), vals[a, layer], float(tail[a, layer])
            if val_c == "fp16":
                present = np.isfinite(v.astype(np.float32))
                row = v.astype(np.float32).astype(np.float64)
            else:
                step, absent = (1 / 16, 255) if val_c.endswith("q8") else (1 / 4, 63)
                present = v != absent
                c = v.astype(np.float64)
                if val_c.startswith("d"):  # delta-coded: the codes are the running sums over present slots
                    c = np.cumsum(np.where(present, c, 0))
                rel = -c * step
                kept_mass = 0.0 if t <= -20 else np.log(1 - np.exp(t))
                row = rel - np.log(np.exp(rel[present]).sum()) + kept_mass
            if ids_c == "plain":
                got = s
            elif ids_c == "sorted":
                got = np.cumsum(np.where(present, s, 0))
            elif ids_c == "prev":
                got = np.array([(ids[a, layer - 1, x] if (layer > 0 and x < k) else x - k) for x in s])
            else:  # prevd: codes < 2k are zigzagged rank deltas into the previous layer's row
                got = np.array([(ids[a, layer - 1, j + (x // 2 if x % 2 == 0 else -(x + 1) // 2)]
                                 if (layer > 0 and x < 2 * k) else x - 2 * k) for j, x in enumerate(s)])
            ent = [(-row[j], int(got[j])) for j in range(k) if present[j]]  # plain/prev: the stored order
            if ids_c == "sorted":
                ent = sorted(ent)  # descending value, ties by ascending id
            for j, (nv, i) in enumerate(ent):
                ids[a, layer, j], lp[a, layer, j] = i, -nv
    return ids, lp


@pytest.mark.parametrize("name", ALL)
def test_tensorstore_reads_golden_v1_2_and_spec_decode_matches(name, expected):
    ts = pytest.importorskip("tensorstore")
    url = os.path.join(GOLDEN, name)
    rd = open_cache(url)
    enc = rd.fingerprint.value_encoding
    for si, seg in enumerate(rd.segments):
        arrs = {}
        for aname in layout.arrays_of(rd.fingerprint):
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/{layout.array_path(seg.part, seg.segment, aname)}"}}
            arrs[aname] = ts.open(spec, read=True).result().read().result()
        ids, lp = spec_decode(enc, arrs["topk_ids"], arrs["topk_logprobs"], arrs["tail_logmass"])
        ao = arrs["answer_offsets"]
        first = int(rd.samples.seg_start[si])
        for j in range(seg.n_samples):
            key = f"{name}/{rd.sample_ids[first + j]}"
            sl = slice(int(ao[j]), int(ao[j + 1]))
            want_lp = expected[f"{key}/topk_logprobs"]
            present = np.isfinite(want_lp)
            np.testing.assert_array_equal(np.where(present, ids[sl], 0), expected[f"{key}/topk_ids"])
            np.testing.assert_allclose(lp[sl][present], want_lp[present], rtol=0, atol=1e-5)
            assert not np.isfinite(lp[sl][~present]).any()
            if name == SAMPLED:
                np.testing.assert_array_equal(arrs[layout.COUNTS][sl], expected[f"{key}/sample_counts"])
