"""Teacher hidden-state features (hidden-states-v1): the bf16 bit rule against torch, record validation, the
fingerprint keys, merge/compact/derive keeping the states, verify and the reader on a bad question CSR, and
`vlsi-cache info`. (Resume, shards, S3 and corruption: the shared tests, parametrized over cache_helpers.KINDS.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_helpers import assert_same, make_fp, make_kind_fp, make_records
from click.testing import CliRunner

from vlsi.cache_format import (CacheWriter, CorruptCacheError, SchemaError, compact, merge, open_cache,
                               verify_cache)
from vlsi.cache_format.derive import derive
from vlsi.cache_format.features import (bf16_bits, bits_of_tensor, float32_of_bits, n_question_rows, question_rows,
                                        tensor_of_bits)


def test_bf16_bits_are_torchs_and_round_trip_exactly():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000) * 10 ** rng.uniform(-30, 30, 5000),
                        [0.0, -0.0, 1.0, 3.0e38, 1e-40, -1e-45, 65504.0, 1.00390625, 1.01171875]]).astype(np.float32)
    t = torch.from_numpy(x)
    want = t.bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(x), want)  # round to nearest even, as torch
    np.testing.assert_array_equal(bits_of_tensor(t), want)
    back = tensor_of_bits(want)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.bfloat16().view(torch.int16))
    np.testing.assert_array_equal(float32_of_bits(want), t.bfloat16().float().numpy())  # exact
    np.testing.assert_array_equal(bf16_bits(float32_of_bits(want)), want)  # bf16 -> float32 -> bf16: identity


def test_question_rows_and_their_count():
    for ap, T in (([3, 4, 5], 8), ([2, 3, 6, 7], 9), ([], 4), ([0], 2), ([5, 9], 11)):
        assert n_question_rows(ap, T) == len(question_rows(ap, T))


def test_fingerprint_keys_and_features():
    assert "hidden_states" not in make_fp().to_dict() and "hidden_size" not in make_fp().to_dict()
    fp = make_kind_fp("features")
    assert fp.to_dict()["hidden_states"] == "all" and fp.features == ("hidden-states-v1",)
    with pytest.raises(SchemaError, match="hidden_size must be > 0 exactly"):
        make_fp(hidden_states="answer")
    with pytest.raises(SchemaError, match="hidden_size must be > 0 exactly"):
        make_fp(hidden_size=8)
    with pytest.raises(SchemaError, match="hidden_states must be one of"):
        make_fp(hidden_states="question", hidden_size=8)


@pytest.mark.parametrize("change,msg", [
    (lambda r: setattr(r, "hidden_answer", r.hidden_answer.astype(np.float32)), "hidden_answer has dtype float32"),
    (lambda r: setattr(r, "hidden_answer", r.hidden_answer[:, :-1]), "hidden_answer has shape"),
    (lambda r: setattr(r, "hidden_question", r.hidden_question[:-1]), "hidden_question has shape"),
    (lambda r: setattr(r, "hidden_question", None), "hidden_question is required"),
    (lambda r: setattr(r, "hidden_answer", None), "hidden_answer is required"),
    (lambda r: r.hidden_question.__setitem__((0, 0), 0x7FC0), "hidden_question holds inf or NaN"),
])
def test_append_validates_features_naming_sample_and_field(tmp_path, change, msg):
    fp = make_kind_fp("features")
    rec = make_records(1, 5, fp)[0]
    assert len(rec.hidden_question) > 0 and len(rec.hidden_answer) > 0
    change(rec)
    with CacheWriter(str(tmp_path / "c"), fp) as w, pytest.raises(SchemaError, match=msg) as e:
        w.append(rec)
    assert "s00000" in str(e.value)


def test_features_given_to_a_topk_cache_are_refused(tmp_path):
    rec = make_records(1, 5, make_kind_fp("features"))[0]
    fp = make_fp(layers=(), verbalizers={"hash": "", "kind": "none", "layers": []})
    with CacheWriter(str(tmp_path / "c"), fp) as w, pytest.raises(SchemaError, match="without hidden_states"):
        w.append(rec)


def test_merge_compact_derive_keep_the_states(tmp_path):
    fp = make_kind_fp("features", k=8)
    recs = make_records(10, 3, fp)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with CacheWriter(a, fp, commit_every=3) as w:
        for r in recs[:6]:
            w.append(r)
    with CacheWriter(b, fp, commit_every=3) as w:
        for r in recs[6:]:
            w.append(r)
    m = str(tmp_path / "m")
    assert merge(m, [a, b]) == 10
    compact(m)
    rd = open_cache(m)
    assert len(rd.segments) == 1
    for r in recs:
        assert_same(r, rd.get(r.sample_id))
    assert verify_cache(m).ok
    d = str(tmp_path / "d")
    derive(m, d, top_k=4)
    rd = open_cache(d)
    assert rd.fingerprint.hidden_states == "all" and rd.fingerprint.top_k == 4
    for r in recs:
        got = rd.get(r.sample_id)
        np.testing.assert_array_equal(got.hidden_answer, r.hidden_answer)
        np.testing.assert_array_equal(got.hidden_question, r.hidden_question)


def test_bad_question_offsets_are_reported_and_refused(tmp_path):
    fp = make_kind_fp("features")
    recs = make_records(4, 9, fp)
    url = str(tmp_path / "c")
    w = CacheWriter(url, fp)
    from vlsi.cache_format import validate_record

    recs = [validate_record(r, fp) for r in recs]
    real = w._write_arrays

    def shifted(data, *a):  # one sample's question rows counted under its neighbour (totals unchanged)
        qo = data["question_offsets"].copy()
        qo[1] += 1
        return real({**data, "question_offsets": qo}, *a)

    w._write_arrays = shifted
    for r in recs:
        w.append(r)
    w.close()
    rep = verify_cache(url)
    assert not rep.ok and any("hidden_question rows, its question rows are" in p for p in rep.problems), rep.problems
    rd = open_cache(url)  # the reader checks the CSR's shape only; a wrong split is refused by the join's shape check
    assert rd.get(recs[0].sample_id).hidden_question.shape[0] == len(recs[0].hidden_question) + 1


def test_reader_refuses_a_question_csr_that_does_not_cover_the_rows(tmp_path):
    fp = make_kind_fp("features")
    recs = make_records(3, 2, fp)
    url = str(tmp_path / "c")
    w = CacheWriter(url, fp)
    real = w._write_arrays

    def broken(data, *a):
        qo = data["question_offsets"].copy()
        qo[-1] -= 1
        return real({**data, "question_offsets": qo}, *a)

    w._write_arrays = broken
    for r in recs:
        w.append(r)
    w.close()
    with pytest.raises(CorruptCacheError, match="question_offsets: not a CSR"):
        open_cache(url).get(recs[0].sample_id)
    with pytest.raises(CorruptCacheError, match="question_offsets: not a CSR"):
        list(open_cache(url).iter())
    assert any("question_offsets: not a CSR" in p for p in verify_cache(url).problems)


def test_cli_info_shows_kinds_d_and_bytes_per_sample(tmp_path):
    from vlsi.cache_format.cli import main

    fp = make_kind_fp("features")
    url = str(tmp_path / "c")
    with CacheWriter(url, fp) as w:
        for r in make_records(5, 1, fp):
            w.append(r)
    r = CliRunner().invoke(main, ["info", url])
    assert r.exit_code == 0, r.output
    for word in ("hidden_states", "all", "hidden_size", "24", "hidden_answer_bytes_per_sample",
                 "hidden_question_bytes_per_sample", "bytes_per_sample"):
        assert word in r.output
    d = json.loads(CliRunner().invoke(main, ["info", url, "--json"]).output)
    assert d["hidden_answer_bytes_per_sample"] > 0 and d["hidden_question_bytes_per_sample"] > 0
    assert d["hidden_answer_bytes_per_sample"] + d["hidden_question_bytes_per_sample"] < d["bytes_per_sample"]


def test_segments_commit_by_size_with_the_states_counted(tmp_path):
    """Memory stays flat in the number of samples: the buffer's bytes include the hidden states, so a writer fed
    features commits a segment whenever they reach segment_bytes (an extraction never holds a shard's features)."""
    fp = make_kind_fp("features", hidden_size=256)
    recs = make_records(12, 4, fp)
    per = [r.hidden_answer.nbytes + r.hidden_question.nbytes for r in recs]
    w = CacheWriter(str(tmp_path / "c"), fp, segment_bytes=3 * max(per))
    peak = 0
    for r in recs:
        w.append(r)
        peak = max(peak, w._buf_bytes)
    w.close()
    assert len(w.segments) >= 3
    assert peak < 3 * max(per) + max(per)  # never more than one segment's worth (plus the top-k bytes) buffered
