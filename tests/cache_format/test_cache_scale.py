"""Format 1.1 at scale: columnar per-sample bookkeeping, constant-size commit records, lookups without a dict of
ids (hash collisions included), sample-table checksums, readers that pickle, writers that follow the root's
version, time-bounded commits."""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from cache_helpers import assert_same, make_fp, make_record, make_records

from vlsi.cache_format import (CacheWriter, CorruptCacheError, compact, finalize, merge, open_cache, samples,
                               verify_cache)
from vlsi.cache_format.commit import seal

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_V1_0 = os.path.join(HERE, "golden", "v1_0")


def _write(url, fp, recs, **kw):
    with CacheWriter(url, fp, **kw) as w:
        for r in recs:
            w.append(r)
    return w


def _uniform(n, fp, prefix="id", seed=0):
    """n records with ids of one length and the same shapes: only the count differs between caches."""
    rng = np.random.default_rng(seed)
    return [make_record(rng, f"{prefix}{i:07d}", fp, T=6, A=2) for i in range(n)]


def test_commit_records_are_constant_size(tmp_path):
    fp = make_fp()
    sizes = {}
    for n in (3, 300):
        url = str(tmp_path / f"c{n}")
        recs = _uniform(n, fp)
        _write(url, fp, recs)
        (commit,) = glob.glob(f"{url}/commits/*/*.json")
        txt = open(commit).read()
        assert recs[-1].sample_id not in txt and '"samples"' not in txt  # no per-sample data in the record
        sizes[n] = len(txt)
        rec = json.loads(txt)
        assert rec["format_version"] == [1, 2] and rec["table"]["n_rows"] == n
        assert os.path.exists(os.path.join(url, rec["table"]["path"]))
    assert abs(sizes[300] - sizes[3]) <= 48, sizes  # a few more digits in the counts and shapes, nothing per sample


def test_open_parses_no_id_lists(tmp_path, monkeypatch):
    """open_cache reads a constant amount of JSON per segment and never takes the v1.0 JSON-list path."""
    import vlsi.cache_format.migrations as migrations
    import vlsi.cache_format.store as store

    fp = make_fp()
    parsed = {}
    for n in (4, 400):
        url = str(tmp_path / f"c{n}")
        _write(url, fp, _uniform(n, fp), commit_every=n // 2)
        real = json.loads
        seen = []

        def counting(data, *a, **k):
            obj = real(data, *a, **k)
            seen.append((len(data), obj))
            return obj

        monkeypatch.setattr(store.json, "loads", counting)
        monkeypatch.setattr(migrations, "samples_from_v1_0", lambda *a, **k: pytest.fail("v1.0 path taken"))
        rd = open_cache(url)
        monkeypatch.undo()
        assert len(rd) == n and len(rd.segments) == 2
        assert all(not (isinstance(o, dict) and "samples" in o) for _, o in seen)
        parsed[n] = (len(seen), sum(b for b, _ in seen))
    assert parsed[4][0] == parsed[400][0] == 3  # the root + one commit record per segment
    assert abs(parsed[400][1] - parsed[4][1]) <= 96, parsed


def test_lookup_with_forced_hash_collisions(tmp_path, monkeypatch):
    """Every id hashes to one of 3 values: lookups must still find exactly the right sample, absent ids none."""
    monkeypatch.setattr(samples, "id_hash", lambda s: len(s) % 3)
    fp = make_fp()
    rng = np.random.default_rng(5)
    recs = [make_record(rng, "x" * (1 + i % 7) + str(i), fp) for i in range(40)]
    url = str(tmp_path / "c")
    _write(url, fp, recs, commit_every=9)
    rd = open_cache(url)
    assert int(np.unique(rd.samples.lookup.hashes()).size) == 3
    for i in np.random.default_rng(0).permutation(len(recs)):
        r = recs[int(i)]
        assert rd.position(r.sample_id) == int(i)
        assert_same(r, rd.get(r.sample_id))
        assert r.sample_id in rd
    for absent in ("xx", "xxx999", "x", "", "yy1", recs[0].sample_id + "z", "x\udcff"):
        assert absent not in rd
        with pytest.raises(KeyError, match="no sample"):
            rd.get(absent)
    assert 12345 not in rd
    assert verify_cache(url).ok  # no false duplicates among colliding ids
    with CacheWriter(url, fp) as w:  # the writer's committed-id lookup collides the same way
        assert [w.append(r) for r in recs[:3]] == [False, False, False]
        assert w.append(make_record(rng, "xx999", fp))
    assert len(open_cache(url)) == 41


def test_constant_hash_still_detects_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "id_hash", lambda s: 7)
    fp = make_fp()
    recs = make_records(3, 0, fp)
    url = str(tmp_path / "c")
    w1, w2 = CacheWriter(url, fp), CacheWriter(url, fp)  # both open before either commits
    w1.append(recs[0]); w1.append(recs[1]); w2.append(recs[2]); w2.append(recs[1])
    w1.close(); w2.close()
    rep = verify_cache(url)
    assert not rep.ok and [p for p in rep.problems if "duplicate" in p] and "'s00001'" in rep.problems[0]
    with pytest.raises(CorruptCacheError, match="duplicate sample id 's00001'"):
        open_cache(url)


@pytest.fixture
def two_segments(tmp_path):
    fp = make_fp(k=8)
    recs = make_records(12, 3, fp)
    url = str(tmp_path / "c")
    _write(url, fp, recs, commit_every=6)
    return url, recs


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_verify_names_a_bad_sample_table(two_segments, how):
    url, recs = two_segments
    (path,) = glob.glob(f"{url}/tables/*/s000001.parquet")
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x21
    else:
        data = data[:-5]
    open(path, "wb").write(bytes(data))
    rep = verify_cache(url)
    assert not rep.ok
    assert any("segment s000001 sample table" in p and "crc32c mismatch" in p for p in rep.problems), rep.problems
    assert all("s000000" not in p for p in rep.problems)
    with pytest.raises(CorruptCacheError, match="segment s000001 sample table.*crc32c mismatch"):
        open_cache(url)


def test_verify_checks_stored_id_hashes(two_segments, tmp_path, monkeypatch):
    url, _ = two_segments
    fp = make_fp(k=8)
    monkeypatch.setattr(samples, "id_hash", lambda s: 1)  # a writer with a wrong hash function
    _write(url, fp, make_records(2, 9, fp, prefix="w"))
    monkeypatch.undo()
    rep = verify_cache(url)
    assert any("segment s000000 sample table: id_hash of 2 sample(s) differs" in p for p in rep.problems), rep.problems


def test_record_and_table_must_agree(two_segments):
    url, _ = two_segments
    (commit,) = glob.glob(f"{url}/commits/*/s000001.json")
    rec = json.load(open(commit))
    rec["n_input_tokens"] += 1
    json.dump(seal(rec), open(commit, "w"))  # a well-sealed record that disagrees with its table
    with pytest.raises(CorruptCacheError, match="segment s000001: sample table has 6 rows"):
        open_cache(url)
    assert any("s000001 sample table" in p for p in verify_cache(url).problems)


def test_finalized_index_is_used_and_checked(two_segments, monkeypatch):
    url, recs = two_segments
    assert finalize(url) == 1
    more = make_records(3, 4, make_fp(k=8), prefix="late")
    _write(url, make_fp(k=8), more)  # committed after the manifest: read from its own table
    reads = []
    real = samples._checked_bytes
    monkeypatch.setattr(samples, "_checked_bytes", lambda loc, ref, where: reads.append(ref["path"]) or real(loc, ref, where))
    rd = open_cache(url)
    assert reads[0].startswith("indexes/") and len(reads) == 2  # one index, one table (not the two listed)
    monkeypatch.undo()
    assert rd.sample_ids == [r.sample_id for r in recs + more]
    for r in recs + more:
        assert_same(r, rd.get(r.sample_id))
    assert verify_cache(url).ok
    (index,) = glob.glob(f"{url}/indexes/*.parquet")
    data = bytearray(open(index, "rb").read())
    data[len(data) // 2] ^= 1
    open(index, "wb").write(bytes(data))
    assert any("manifest 1 index" in p for p in verify_cache(url).problems)
    with pytest.raises(CorruptCacheError, match="manifest 1 index"):
        open_cache(url)


def test_reader_pickles_small_and_reopens(two_segments):
    url, recs = two_segments
    rd = open_cache(url)
    blob = pickle.dumps(rd)
    assert len(blob) < 500 and recs[0].sample_id.encode() not in blob
    rd2 = pickle.loads(blob)
    assert rd2.sample_ids == rd.sample_ids and rd2.url == rd.url
    assert_same(recs[7], rd2.get(recs[7].sample_id))


def test_bookkeeping_is_columnar(tmp_path):
    """Per-sample memory is a few flat arrays (~85 B/sample here), not Python objects per id."""
    fp = make_fp(k=2, layers=(0,))
    url = str(tmp_path / "c")
    w = CacheWriter(url, fp)
    n, T, A = 20000, 4, 1
    for start in range(0, n, 5000):
        m = 5000
        ids = [f"sample/{i:010d}" for i in range(start, start + m)]  # 17 characters
        data = {"input_ids": np.zeros(m * T, np.int32), "input_offsets": np.arange(m + 1, dtype=np.int64) * T,
                "answer_positions": np.zeros(m, np.int32), "answer_offsets": np.arange(m + 1, dtype=np.int64),
                "topk_ids": np.tile(np.array([0, 1], np.int32), (m, 2, 1)),
                "topk_logprobs": np.full((m, 2, 2), -1.0, np.float16), "tail_logmass": np.full((m, 2), -1.0, np.float32)}
        w._commit_segment_arrays(data, ids, [f"{i:064x}" for i in range(start, start + m)], np.full(m, T), np.full(m, A))
    w.close()
    rd = open_cache(url)
    assert len(rd) == n and isinstance(rd.samples.content, samples.HexColumn)  # hex hashes kept as 32 raw bytes
    assert rd.samples.nbytes / n < 90
    assert rd.get("sample/0000012345").content_hash == f"{12345:064x}"
    assert rd.index.column("content_hash")[777].as_py() == f"{777:064x}"


def test_v1_0_cache_gets_v1_0_records_and_merge_upgrades(tmp_path):
    """A writer adds the cache's version: resuming a 1.0 cache keeps it readable by 1.0 readers."""
    from make_golden import golden_fingerprint_dict

    from vlsi.cache_format import Fingerprint, SampleRecord

    src = str(tmp_path / "g10")
    shutil.copytree(GOLDEN_V1_0, src)
    fp = Fingerprint.from_dict(golden_fingerprint_dict())
    old = open_cache(src)
    r = old[0]
    rec = SampleRecord("new-1", "h", r.input_ids, r.answer_positions, r.topk_ids, r.topk_logprobs, r.tail_logmass)
    with CacheWriter(src, fp, commit_every=1) as w:
        assert w.version == (1, 0) and not w.append(old[1])  # resume skips ids committed in 1.0 records
        assert w.append(rec)
    commits = sorted(glob.glob(f"{src}/commits/*/*.json"))
    new = json.load(open(commits[0] if "golden" not in commits[0] else commits[-1]))
    assert new["format_version"] == [1, 0] and new["samples"]["sample_id"] == ["new-1"] and "table" not in new
    assert not os.path.exists(f"{src}/tables")
    with CacheWriter(src, fp, commit_every=1) as w:  # its id lookups merge the 1.0 ones (in-process hashes)
        for i in range(2, 6):                        # with its own (stored id_hash): all still found
            assert w.append(SampleRecord(f"new-{i}", "h", r.input_ids, r.answer_positions, r.topk_ids,
                                         r.topk_logprobs, r.tail_logmass))
        assert len(w._runs) < 5 and all(sid in w.committed_ids() for sid in old.sample_ids)
        assert not w.append(old[3]) and not w.append(rec) and "new-4" in w.committed_ids()
    rd = open_cache(src)
    assert rd.attrs["format_version"] == [1, 0] and len(rd) == 11 and rd.get("new-1").content_hash == "h"
    assert verify_cache(src).ok
    compact(src)  # a rewrite in place stays 1.0 too
    man = json.load(open(glob.glob(f"{src}/manifests/*.json")[0]))
    assert man["format_version"] == [1, 0] and isinstance(man["index"], str)
    assert all("samples" in s for s in man["segments"])
    assert len(open_cache(src)) == 11 and verify_cache(src).ok
    finalize(src)  # a 1.0 manifest lists the ids again (from the reader's columns)
    assert open_cache(src).sample_ids == rd.sample_ids and verify_cache(src).ok
    dst = str(tmp_path / "up")
    assert merge(dst, [src]) == 11  # a new cache: the newest version
    up = open_cache(dst)
    assert up.attrs["format_version"] == [1, 2] and all(s.version == (1, 2) and s.table for s in up.segments)
    for a, b in zip(open_cache(src).iter(), up.iter()):
        assert_same(a, b)


def test_commit_seconds_with_an_injected_clock(tmp_path):
    fp = make_fp()
    recs = make_records(8, 1, fp)
    now = [0.0]
    url = str(tmp_path / "c")
    w = CacheWriter(url, fp, commit_seconds=10, clock=lambda: now[0])

    def committed():
        return len(glob.glob(f"{url}/commits/*/*.json"))

    for t, r in zip((0, 1, 2), recs):
        now[0] = t
        w.append(r)
    assert committed() == 0
    now[0] = 10.5
    w.append(recs[3])  # 10.5 s since the writer opened: the 4 buffered samples are committed
    assert committed() == 1 and w.segments[-1].n_samples == 4
    now[0] = 11
    w.append(recs[4])
    assert w.commit_if_due() is None and committed() == 1  # 0.5 s since that commit
    now[0] = 20.4
    assert w.commit_if_due() is None
    now[0] = 20.6
    assert w.commit_if_due().n_samples == 1 and committed() == 2  # due without a new append
    assert w.commit_if_due() is None  # nothing buffered
    for r in recs[5:]:
        w.append(r)
    w.close()
    assert [s.n_samples for s in w.segments] == [4, 1, 3]
    assert open_cache(url).sample_ids == [r.sample_id for r in recs]
    with pytest.raises(Exception, match="commit_seconds"):
        CacheWriter(url, fp, commit_seconds=0)


def test_fast_reads_equal_zarr(tmp_path):
    """The direct shard reader (fastread) returns exactly what zarr-python reads, including shards zarr skipped
    because every value is the fill value, and empty arrays."""
    import zarr

    from vlsi.cache_format import SampleRecord, layout
    from vlsi.cache_format.fastread import FastArray, open_fast

    fp = make_fp(layers=(0, 2, 5), k=6)
    recs = make_records(20, 8, fp)
    zeros = [SampleRecord(f"z{i}", "h", np.arange(5, dtype=np.int32), np.array([0], np.int32),
                          np.zeros((1, 4, 6), np.int32), np.zeros((1, 4, 6), np.float32), np.zeros((1, 4), np.float32))
             for i in range(3)]  # answer_positions / topk_* / tail all zeros: zarr writes no shard for them
    empty = [make_record(np.random.default_rng(1), f"e{i}", fp, T=4, A=0) for i in range(2)]
    url = str(tmp_path / "c")
    w = _write(url, fp, recs + zeros + empty, commit_every=10, chunk_bytes=200)
    assert [s.n_samples for s in w.segments] == [10, 10, 5]
    rd = open_cache(url)
    store = rd.loc.zarr_store()
    n_fast = 0
    for seg in rd.segments:
        for name in layout.ARRAYS:
            path = layout.array_path(seg.part, seg.segment, name)
            fast = open_fast(rd.loc, path)
            assert isinstance(fast, FastArray), path
            z = zarr.open_array(store, path=path, mode="r")
            assert fast.shape == z.shape and fast.dtype == z.dtype and fast.chunks == z.chunks
            np.testing.assert_array_equal(fast[0:z.shape[0]], z[...])
            for lo, hi in ((0, 1), (1, 3), (z.shape[0] // 2, z.shape[0])):
                np.testing.assert_array_equal(fast[lo:hi], z[lo:hi])
            n_fast += 1
    assert n_fast == 21
    for name in ("answer_positions", "topk_logprobs", "tail_logmass"):  # all zeros: zarr wrote no shard
        assert not [p for p in glob.glob(f"{url}/parts/*/s000002/{name}/c/**", recursive=True) if os.path.isfile(p)]
    for want in recs + zeros + empty:
        assert_same(want, rd.get(want.sample_id))


def test_content_hashes_round_trip_whatever_their_form(tmp_path):
    """Lowercase hex hashes are kept as raw bytes; anything else (uppercase, mixed, other text) as strings, also when
    the form changes from one segment to the next."""
    from vlsi.cache_format import SampleRecord

    fp = make_fp()
    rng = np.random.default_rng(2)
    forms = [f"{7:064x}", f"{8:064x}", "ABCDEF" * 10 + "0123", "hash-x", "", f"{9:064x}"]
    recs = []
    for i, h in enumerate(forms):
        r = make_record(rng, f"c{i}", fp)
        recs.append(SampleRecord(r.sample_id, h, r.input_ids, r.answer_positions, r.topk_ids, r.topk_logprobs,
                                 r.tail_logmass))
    for name, order in (("hex-first", recs), ("text-first", recs[::-1])):
        url = str(tmp_path / name)
        _write(url, fp, order, commit_every=2)
        rd = open_cache(url)
        assert [rd.get(r.sample_id).content_hash for r in recs] == forms
        assert sorted(rd.index.column("content_hash").to_pylist()) == sorted(forms)
    url = str(tmp_path / "all-hex")
    _write(url, fp, [recs[0], recs[1], recs[5]], commit_every=2)
    rd = open_cache(url)
    assert isinstance(rd.samples.content, samples.HexColumn) and rd.get("c5").content_hash == forms[5]


def test_find_many_matches_find(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "id_hash", lambda s: len(s) % 2)  # collisions everywhere
    fp = make_fp()
    recs = make_records(30, 1, fp)
    url = str(tmp_path / "c")
    _write(url, fp, recs, commit_every=7)
    queries = [r.sample_id for r in recs[::-1]] + ["nope", "s0000", "s99999", "\udcff"]
    with CacheWriter(url, fp) as w:
        got = w.committed_ids().contains_many(queries)
        assert got.tolist() == [q in w.committed_ids() for q in queries] == [True] * 30 + [False] * 4
    rd = open_cache(url)
    pos = rd.samples.lookup.find_many(queries)
    assert pos.tolist() == [rd.samples.find(q) for q in queries] == list(range(29, -1, -1)) + [-1] * 4
    monkeypatch.undo()  # the real hash: a lone surrogate cannot be encoded, so it is simply absent
    assert samples.IdLookup(samples.StringColumn(b"ab", np.array([0, 2], np.int32)),
                            samples.id_hashes(["ab"])).find_many(["ab", "\udcff", 3]).tolist() == [0, -1, -1]
