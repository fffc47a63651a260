"""Round trips (hypothesis), alignment, validation and fingerprint rules."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from cache_helpers import assert_same, make_fp, make_record, make_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlsi.cache_format import (CacheError, CacheNotFoundError, CacheWriter, DuplicateSampleError,
                               FingerprintMismatchError, Fingerprint, SampleRecord, SchemaError, StorageError,
                               VersionError, check_compatibility, diff_fingerprints, in_shard, open_cache,
                               verify_cache)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.integers(0, 30), min_size=0, max_size=4, unique=True).map(sorted),
       k=st.integers(1, 9), n=st.integers(1, 12), commit_every=st.integers(1, 5),
       chunk_bytes=st.sampled_from([16, 200, 1 << 20]), seed=st.integers(0, 2**16))
def test_roundtrip_property(layers, k, n, commit_every, chunk_bytes, seed):
    fp = make_fp(layers=tuple(layers), k=k, vocab=64)
    recs = make_records(n, seed, fp)
    url = f"memory://rt-{uuid.uuid4().hex}"
    with CacheWriter(url, fp, commit_every=commit_every, chunk_bytes=chunk_bytes) as w:
        for r in recs:
            assert w.append(r)
    rd = open_cache(url)
    assert len(rd) == n and rd.sample_ids == [r.sample_id for r in recs]
    assert rd.fingerprint == fp
    for r, got in zip(recs, rd.iter(prefetch=2)):
        assert_same(r, got)
    for i in np.random.default_rng(seed).permutation(n):  # random access, any order
        assert_same(recs[i], rd[int(i)])
        assert_same(recs[i], rd.get(recs[i].sample_id))
    assert rd.index.num_rows == n
    assert rd.index.column("n_answer").to_pylist() == [len(r.answer_positions) for r in recs]
    assert len(rd.segments) == -(-n // commit_every)


def test_alignment_row_t_predicts_token_t_plus_1(tmp_path):
    """A 'teacher' that is certain of the next token: the top-1 id of row a MUST equal input_ids[pos[a] + 1]."""
    fp = make_fp(layers=(0,), k=2, vocab=50)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 12).astype(np.int32)
    pos = np.array([3, 4, 7, 10], np.int32)
    nxt = ids[pos + 1]
    topk = np.stack([np.stack([nxt, (nxt + 1) % 50], -1)] * 2, 1).astype(np.int32)  # [A, L=2, k=2]
    lp = np.broadcast_to(np.log(np.array([0.9, 0.05], np.float32)), topk.shape).copy()
    tail = np.full((4, 2), np.log(0.05), np.float32)
    with CacheWriter(str(tmp_path / "c"), fp) as w:
        w.append(SampleRecord("x", "h", ids, pos, topk, lp, tail))
    got = open_cache(str(tmp_path / "c")).get("x")
    np.testing.assert_array_equal(got.topk_ids[:, -1, 0], got.target_ids)
    np.testing.assert_array_equal(got.target_ids, ids[pos + 1])


def test_empty_answer_and_local_paths(tmp_path):
    fp = make_fp()
    rng = np.random.default_rng(0)
    recs = [make_record(rng, "a", fp, T=5, A=0), make_record(rng, "b", fp, T=6, A=5)]
    url = "file://" + str(tmp_path / "c")
    with CacheWriter(url, fp) as w:
        for r in recs:
            w.append(r)
    rd = open_cache(str(tmp_path / "c"))
    assert rd.get("a").topk_ids.shape == (0, 3, 4)
    assert_same(recs[1], rd.get("b"))
    assert "a" in rd and "zz" not in rd
    info = rd.info()
    assert info["n_samples"] == 2 and info["n_answer_tokens"] == 5 and info["layers"] == ["1", "3", "final"]
    assert info["bytes_on_disk"] > 0 and info["bytes_per_answer_token"] == info["bytes_on_disk"] / 5


def _bad(fp, **over):
    r = make_record(np.random.default_rng(0), "bad", fp, T=10, A=3)
    d = dict(sample_id=r.sample_id, content_hash=r.content_hash, input_ids=r.input_ids,
             answer_positions=r.answer_positions, topk_ids=r.topk_ids, topk_logprobs=r.topk_logprobs,
             tail_logmass=r.tail_logmass)
    d.update(over)
    return SampleRecord(**d)


@pytest.mark.parametrize("field,value,msg", [
    ("topk_ids", np.zeros((3, 3, 5), np.int32), "topk_ids has shape"),
    ("topk_ids", np.zeros((3, 3, 4), np.float32), "topk_ids has dtype"),
    ("topk_logprobs", np.zeros((3, 3, 4), np.int32), "topk_logprobs has dtype"),
    ("tail_logmass", np.zeros((3, 2), np.float32), "tail_logmass has shape"),
    ("answer_positions", np.array([0, 9, 2], np.int32), "answer_positions must be strictly increasing"),
    ("answer_positions", np.array([2, 1, 3], np.int32), "answer_positions must be strictly increasing"),
    ("topk_ids", np.full((3, 3, 4), 100, np.int32), "outside [0, vocab_size=100)"),
    ("topk_logprobs", np.full((3, 3, 4), 0.5, np.float32), "must be log-probs"),
])
def test_append_validation_names_sample_and_field(tmp_path, field, value, msg):
    fp = make_fp()
    with CacheWriter(str(tmp_path / "c"), fp) as w:
        with pytest.raises(SchemaError, match="sample 'bad'") as ei:
            w.append(_bad(fp, **{field: value}))
        assert msg in str(ei.value) and "\n" not in str(ei.value)
        w.append(_bad(fp))  # the writer is still usable
    assert len(open_cache(str(tmp_path / "c"))) == 1


def test_duplicates_and_resume_modes(tmp_path):
    fp = make_fp()
    url = str(tmp_path / "c")
    recs = make_records(4, 0, fp)
    with CacheWriter(url, fp) as w:
        for r in recs[:2]:
            w.append(r)
        with pytest.raises(DuplicateSampleError, match="s00001"):
            w.append(recs[1])
    with CacheWriter(url, fp, resume=True) as w:
        assert w.committed_ids() == {"s00000", "s00001"}
        assert [w.append(r) for r in recs] == [False, False, True, True]
    with CacheWriter(url, fp, resume=False) as w:
        with pytest.raises(DuplicateSampleError, match="already committed"):
            w.append(recs[0])
    rd = open_cache(url)
    assert rd.sample_ids == [r.sample_id for r in recs] and verify_cache(url).ok


def test_fingerprint_diff_and_writer_refuses_mismatch(tmp_path):
    a = make_fp()
    b = make_fp(teacher={"name": "tiny-teacher", "config_hash": "OTHER", "num_layers": 4}, top_k=5,
                created_at="2030")
    diffs = diff_fingerprints(a, b)
    assert [d.field for d in diffs] == ["teacher.config_hash", "top_k"]
    assert diffs[0].cache_value == "c0ffee" and diffs[0].given_value == "OTHER"
    assert diff_fingerprints(a, make_fp(created_at="other", tool_version="9")) == []
    assert Fingerprint.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(SchemaError, match="unknown keys"):
        Fingerprint.from_dict({**a.to_dict(), "surprise": 1})
    with pytest.raises(SchemaError, match="target_layers"):
        make_fp(layers=(3, 1))
    with pytest.raises(SchemaError, match="unknown value_encoding"):
        make_fp(value_encoding="int4-magic")
    url = str(tmp_path / "c")
    with CacheWriter(url, a) as w:
        w.append(make_records(1, 0, a)[0])
    with pytest.raises(FingerprintMismatchError, match="teacher.config_hash.*top_k"):
        CacheWriter(url, b)


def test_check_compatibility():
    class Tok:
        chat_template = "{{x}}"
        special_tokens_map = {"eos_token": "</s>"}

        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    from vlsi.cache_format import tokenizer_hash
    fp = make_fp(tokenizer_hash=tokenizer_hash(Tok()), vocab=2, padded=8, k=1, processor={"patch_size": 14})
    assert check_compatibility(fp, tokenizer=Tok(), processor={"patch_size": 14}) == []
    t2 = Tok()
    t2.chat_template = "other"
    diffs = check_compatibility(fp, tokenizer=t2, processor={"patch_size": 16}, padded_vocab_size=16)
    assert sorted(d.field for d in diffs) == ["padded_vocab_size", "processor.patch_size", "tokenizer_hash"]


def _write_root(path, attrs):
    import os
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/zarr.json", "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {"vlsi_cache": attrs}}, f)


def test_version_rules(tmp_path):
    fpd = make_fp().to_dict()
    base = {"format": "vlsi-teacher-cache", "format_version": [1, 0], "required": ["csr-segments-v1"],
            "fingerprint": fpd}
    _write_root(tmp_path / "ok", base)
    assert len(open_cache(str(tmp_path / "ok"))) == 0
    _write_root(tmp_path / "newer", {**base, "format_version": [2, 0]})
    with pytest.raises(VersionError, match=r"2\.0 is newer than this reader \(1\.2\)"):
        open_cache(str(tmp_path / "newer"))
    _write_root(tmp_path / "feat", {**base, "format_version": [1, 3], "required": ["csr-segments-v1", "fancy"]})
    with pytest.raises(VersionError, match="fancy"):
        open_cache(str(tmp_path / "feat"))
    _write_root(tmp_path / "minor", {**base, "format_version": [1, 7], "new_optional": 1})
    assert open_cache(str(tmp_path / "minor")).fingerprint == make_fp()  # newer minor: readable
    _write_root(tmp_path / "unk", {**base, "bogus": 1})
    with pytest.raises(SchemaError, match="unknown root keys"):
        open_cache(str(tmp_path / "unk"))
    with pytest.raises(VersionError):  # a writer refuses too
        CacheWriter(str(tmp_path / "newer"), make_fp())


def test_missing_readonly_and_bad_options(tmp_path):
    with pytest.raises(CacheNotFoundError, match="not found"):
        open_cache(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()  # reading never creates anything
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot"):  # a location nothing can be written to
        CacheWriter(str(tmp_path / "file" / "c"), make_fp())
    with pytest.raises(StorageError, match="bad storage options"):
        open_cache(str(tmp_path / "c"), storage_options={"endpoint_url": "x"})
    with pytest.raises(CacheError):
        open_cache("nosuchscheme://bucket/c")


def test_in_shard_partitions():
    ids = [f"id{i}" for i in range(300)]
    shards = [[s for s in ids if in_shard(s, (i, 3))] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and all(60 < len(s) < 140 for s in shards)


def test_config_hash_ignores_load_dtype_in_sub_configs():
    from vlsi.cache_format import config_hash

    a = {"model_type": "qwen2_vl", "dtype": "float32", "text_config": {"hidden_size": 8, "dtype": "float32"}}
    b = {"model_type": "qwen2_vl", "dtype": "bfloat16", "text_config": {"hidden_size": 8, "dtype": "bfloat16"}}
    c = {"model_type": "qwen2_vl", "dtype": "bfloat16", "text_config": {"hidden_size": 16, "dtype": "bfloat16"}}
    assert config_hash(a) == config_hash(b) != config_hash(c)
