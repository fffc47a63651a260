"""The committed golden feature caches (format 1.2, hidden-states-v1; make_golden_features.py) must be read by
every later version with exactly the stored bit patterns; tensorstore (an independent Zarr v3 reader) must find the
same arrays, and SPEC section 5b's bf16 rule, re-implemented here, gives the pinned values; a 1.1 reader, and a 1.2
reader without the feature, refuse them by name; the older golden fixtures keep reading (their own tests)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from make_golden import N_SAMPLES, golden_arrays
from make_golden_features import D, KINDS

from vlsi.cache_format import layout, open_cache, verify_cache
from vlsi.cache_format.errors import VersionError
from vlsi.cache_format.migrations import check_and_migrate

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "v1_2_features")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(GOLDEN, "expected.npz")) as z:
        return dict(z)


@pytest.mark.parametrize("kind", KINDS)
def test_golden_features_read_exactly(kind, expected):
    url = os.path.join(GOLDEN, kind)
    rd = open_cache(url)
    fp = rd.fingerprint
    assert rd.attrs["format_version"] == [1, 2] and len(rd) == N_SAMPLES
    assert rd.attrs["required"] == ["csr-segments-v1", "sample-tables-v1", "hidden-states-v1"]
    assert (fp.hidden_states, fp.hidden_size) == (kind, D)
    assert fp.n_layers == (1 if kind == "all" else 3)
    src = {d["sample_id"]: d for d in golden_arrays()}
    for got in list(rd.iter()) + [rd.get(s) for s in rd.sample_ids]:
        key = f"{kind}/{got.sample_id}"
        np.testing.assert_array_equal(got.input_ids, src[got.sample_id]["input_ids"])
        np.testing.assert_array_equal(got.answer_positions, src[got.sample_id]["answer_positions"])
        assert got.hidden_answer.dtype == np.uint16
        np.testing.assert_array_equal(got.hidden_answer, expected[f"{key}/hidden_answer"])
        if kind == "all":
            np.testing.assert_array_equal(got.hidden_question, expected[f"{key}/hidden_question"])
            np.testing.assert_array_equal(got.topk_ids, expected[f"{key}/topk_ids"])
        else:
            assert got.hidden_question is None
    assert verify_cache(url).ok
    info = rd.info()
    assert info["hidden_states"] == kind and info["hidden_size"] == D and info["hidden_answer_bytes_per_sample"] > 0


def test_bf16_rule_of_the_spec_on_pinned_values(expected):
    """SPEC 5b: value = float32 whose high 16 bits are the pattern and low 16 bits zero."""
    first = next(v for k, v in sorted(expected.items()) if k.startswith("all/") and k.endswith("/hidden_answer")
                 and len(v))  # the generator pins the first answer row of each sample that has one
    bits = first[0].astype(np.uint32)
    vals = (bits << 16).view(np.float32)
    want = np.array([0.0, 1.0, -2.5, 3.3895313892515355e38, 1.1754943508222875e-38, -0.0, 0.5, 7.0], np.float32)
    np.testing.assert_array_equal(vals, want)
    assert np.signbit(vals[5])


@pytest.mark.parametrize("features", [frozenset({"csr-segments-v1", "sample-tables-v1"}),
                                      frozenset({"csr-segments-v1", "sample-tables-v1", "topk-encodings-v1",
                                                 "sampled-targets-v1", "derived-caches-v1"})])
def test_older_readers_refuse_by_feature_name(monkeypatch, features):
    import vlsi.cache_format.migrations as mig

    monkeypatch.setattr(mig, "KNOWN_FEATURES", features)
    for kind in KINDS:
        attrs = json.load(open(os.path.join(GOLDEN, kind, "zarr.json")))["attributes"]["vlsi_cache"]
        with pytest.raises(VersionError, match=r"does not know: \['hidden-states-v1'\]"):
            check_and_migrate(attrs, "golden")


@pytest.mark.parametrize("kind", KINDS)
def test_tensorstore_reads_the_feature_arrays(kind, expected):
    ts = pytest.importorskip("tensorstore")
    url = os.path.join(GOLDEN, kind)
    rd = open_cache(url)
    (seg,) = rd.segments
    arrs = {}
    for name in layout.arrays_of(rd.fingerprint):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file",
                                               "path": f"{url}/{layout.array_path(seg.part, seg.segment, name)}"}}
        arrs[name] = ts.open(spec, read=True).result().read().result()
    ao = arrs["answer_offsets"]
    qo = arrs.get("question_offsets")
    for j, sid in enumerate(rd.sample_ids):
        np.testing.assert_array_equal(arrs["hidden_answer"][ao[j]:ao[j + 1]], expected[f"{kind}/{sid}/hidden_answer"])
        if kind == "all":
            np.testing.assert_array_equal(arrs["hidden_question"][qo[j]:qo[j + 1]],
                                          expected[f"{kind}/{sid}/hidden_question"])
