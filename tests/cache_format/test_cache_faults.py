"""Corruption, truncation, crash (SIGKILL) + resume, concurrent shard writers: for top-k caches and for feature
caches (hidden states, cache_helpers.KINDS) alike."""
from __future__ import annotations

import glob
import os
import signal

import numpy as np
import pytest
from cache_helpers import KINDS, assert_same, child_writer as _child, make_fp, make_kind_fp, make_records

from vlsi.cache_format import CacheError, CacheWriter, CorruptCacheError, open_cache, verify_cache

def _write(url, fp, recs, **kw):
    with CacheWriter(url, fp, **kw) as w:
        for r in recs:
            w.append(r)


def _shard_file(root, name, seg="s000000"):
    (path,) = [p for p in glob.glob(f"{root}/parts/*/{seg}/{name}/c/**", recursive=True) if os.path.isfile(p)]
    return path


@pytest.fixture(params=list(KINDS))
def cache(tmp_path, request):
    fp = make_kind_fp(request.param, k=8)
    recs = make_records(12, 3, fp)
    url = str(tmp_path / "c")
    _write(url, fp, recs, commit_every=6, chunk_bytes=512)
    return url, recs


ARRAYS_OF = {"topk": ["topk_ids", "topk_logprobs", "input_ids", "tail_logmass"],
             "features": ["hidden_answer", "hidden_question", "question_offsets", "topk_ids"]}


@pytest.mark.parametrize("kind,name", [(k, n) for k, names in ARRAYS_OF.items() for n in names])
def test_flipped_byte_is_named_by_verify_and_refused_by_reader(tmp_path, kind, name):
    fp = make_kind_fp(kind, k=8)
    recs = make_records(12, 3, fp)
    url = str(tmp_path / "c")
    _write(url, fp, recs, commit_every=6, chunk_bytes=512)
    path = _shard_file(url, name, "s000001")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x5A  # inside a compressed inner chunk (the shard index sits at the end)
    open(path, "wb").write(bytes(data))
    rep = verify_cache(url)
    assert not rep.ok
    assert any(f"segment s000001 array {name} chunk" in p for p in rep.problems), rep.problems
    assert all("s000000" not in p for p in rep.problems)
    rd = open_cache(url)
    for r in recs[:6]:  # the intact segment still reads
        assert_same(r, rd.get(r.sample_id))
    with pytest.raises(CorruptCacheError, match=f"segment s000001 array {name}"):
        for r in recs[6:]:
            rd.get(r.sample_id)
    with pytest.raises(CorruptCacheError):
        list(open_cache(url).iter())


def test_truncated_shard_and_corrupt_commit_record(cache):
    url, recs = cache
    path = _shard_file(url, "topk_ids")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 7])
    rep = verify_cache(url)
    assert not rep.ok and any("segment s000000 array topk_ids" in p for p in rep.problems), rep.problems
    with pytest.raises(CorruptCacheError):
        open_cache(url).get(recs[0].sample_id)
    (commit,) = glob.glob(f"{url}/commits/*/s000001.json")
    txt = open(commit).read()
    assert '"n_samples": 6' in txt and recs[7].sample_id not in txt  # v1.1: no ids in the record
    open(commit, "w").write(txt.replace('"n_samples": 6', '"n_samples": 5'))
    rep = verify_cache(url)
    assert any("s000001.json: checksum mismatch" in p for p in rep.problems), rep.problems
    with pytest.raises(CorruptCacheError, match="s000001.json: checksum mismatch"):
        open_cache(url)


def test_uncommitted_segment_is_invisible(cache, tmp_path):
    url, recs = cache
    (commit,) = glob.glob(f"{url}/commits/*/s000001.json")
    os.remove(commit)  # what a crash between writing the arrays and the commit record leaves
    rd = open_cache(url)
    assert rd.sample_ids == [r.sample_id for r in recs[:6]]
    rep = verify_cache(url)
    assert rep.ok and any("uncommitted" in n for n in rep.notes)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, kind):
    fp = make_kind_fp(kind, k=8)
    recs = make_records(40, 11, fp)
    ref = str(tmp_path / "ref")
    _write(ref, fp, recs, commit_every=5, chunk_bytes=256)
    url = str(tmp_path / "killed")
    p = _child(url, sleep=0.02, kind=kind)
    for line in p.stdout:  # kill mid-segment: 23 appended, 20 committed, 3 buffered
        if line.strip() == "appended 22":
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    partial = open_cache(url)
    assert 0 < len(partial) < 40 and len(partial) % 5 == 0  # only whole committed segments are visible
    assert verify_cache(url).ok
    p = _child(url, kind=kind)  # resume: same shard, skips committed ids
    out = p.communicate()[0]
    assert p.returncode == 0 and "done" in out
    got, want = open_cache(url), open_cache(ref)
    assert got.sample_ids == want.sample_ids
    for a, b in zip(want.iter(), got.iter()):
        assert_same(a, b)
    assert verify_cache(url).ok


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_concurrent_shard_writers(tmp_path, kind):
    url = str(tmp_path / "c")
    fp = make_kind_fp(kind, k=8)
    _write(url, fp, [])  # the cache root exists before the workers start (as vlsi-extract does)
    procs = [_child(url, i, 2, kind=kind) for i in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rd = open_cache(url)
    recs = make_records(40, 11, fp)
    assert sorted(rd.sample_ids) == sorted(r.sample_id for r in recs)
    assert len({s.part for s in rd.segments}) == 2
    for r in recs:
        assert_same(r, rd.get(r.sample_id))
    assert verify_cache(url).ok


def test_concurrent_duplicate_is_reported_by_verify(tmp_path):
    url = str(tmp_path / "c")
    fp = make_fp()
    recs = make_records(3, 0, fp)
    w1, w2 = CacheWriter(url, fp), CacheWriter(url, fp)  # both open before either commits
    w1.append(recs[0]); w2.append(recs[0]); w2.append(recs[1])
    w1.close(); w2.close()
    rep = verify_cache(url)
    assert not rep.ok and any("duplicate sample id 's00000'" in p for p in rep.problems)
    with pytest.raises(CacheError, match="duplicate sample id"):
        open_cache(url)
