"""The same guarantees on S3, served by moto's server on 127.0.0.1 through s3fs."""
from __future__ import annotations

import os
import signal
import socket

import pytest
from cache_helpers import KINDS, assert_same, child_writer, make_fp, make_kind_fp, make_records

from vlsi.cache_format import (CacheError, CacheWriter, CorruptCacheError, StorageError, compact, finalize,
                               open_cache, verify_cache)

pytestmark = pytest.mark.s3
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, **creds)
    client.create_bucket(Bucket="vlsi")
    opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"}}
    yield client, opts
    server.stop()


@pytest.mark.parametrize("kind", list(KINDS))
def test_s3_roundtrip_finalize_compact(s3, kind):
    _, opts = s3
    fp = make_kind_fp(kind, k=8)
    recs = make_records(14, 2, fp)
    url = f"s3://vlsi/rt-{kind}"
    with CacheWriter(url, fp, storage_options=opts, commit_every=4, chunk_bytes=300) as w:
        for r in recs:
            w.append(r)
    rd = open_cache(url, storage_options=opts)
    assert rd.sample_ids == [r.sample_id for r in recs]
    for r, got in zip(recs, rd.iter()):
        assert_same(r, got)
    assert_same(recs[9], rd.get(recs[9].sample_id))
    from vlsi.cache_format.fastread import FastArray
    assert isinstance(rd._array(rd.segments[0], "topk_ids"), FastArray)  # byte-range reads work on S3 too
    assert finalize(url, storage_options=opts) == 1
    assert compact(url, storage_options=opts)["segments_after"] == 1
    rd = open_cache(url, storage_options=opts)
    assert len(rd.segments) == 1 and [r.sample_id for r in rd.iter()] == [r.sample_id for r in recs]
    for r in recs:  # byte-range reads of the compacted segment, hidden states included
        assert_same(r, rd.get(r.sample_id))
    if kind == "features":  # info lists the feature arrays' bytes through the object store's listing
        assert rd.info()["hidden_question_bytes_per_sample"] > 0
    assert verify_cache(url, storage_options=opts).ok


@pytest.mark.parametrize("kind,name", [("topk", "topk_logprobs"), ("features", "hidden_question")])
def test_s3_flipped_byte(s3, kind, name):
    client, opts = s3
    fp = make_kind_fp(kind, k=8)
    recs = make_records(6, 4, fp)
    url = f"s3://vlsi/flip-{kind}"
    with CacheWriter(url, fp, storage_options=opts) as w:
        for r in recs:
            w.append(r)
    (key,) = [o["Key"] for o in client.list_objects_v2(Bucket="vlsi", Prefix=f"flip-{kind}/parts")["Contents"]
              if f"/{name}/c/" in o["Key"]]
    data = bytearray(client.get_object(Bucket="vlsi", Key=key)["Body"].read())
    data[len(data) // 3] ^= 0xFF
    client.put_object(Bucket="vlsi", Key=key, Body=bytes(data))
    rep = verify_cache(url, storage_options=opts)
    assert not rep.ok and any(f"segment s000000 array {name} chunk" in p for p in rep.problems)
    with pytest.raises(CorruptCacheError):
        list(open_cache(url, storage_options=opts).iter())


@pytest.mark.parametrize("kind", list(KINDS))
def test_s3_sigkill_resume_and_concurrent_shards(s3, kind):
    _, opts = s3
    fp = make_kind_fp(kind, k=8)
    recs = make_records(40, 11, fp)
    url = f"s3://vlsi/kill-{kind}"
    p = child_writer(url, sleep=0.01, so=opts, kind=kind)
    for line in p.stdout:
        if line.strip() == "appended 17":
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert 0 < len(open_cache(url, storage_options=opts)) < 40
    p = child_writer(url, so=opts, kind=kind)
    assert p.wait() == 0
    rd = open_cache(url, storage_options=opts)
    assert rd.sample_ids == [r.sample_id for r in recs]
    for r, got in zip(recs, rd.iter()):
        assert_same(r, got)
    url2 = f"s3://vlsi/shards-{kind}"
    with CacheWriter(url2, fp, storage_options=opts):
        pass
    procs = [child_writer(url2, i, 2, so=opts, kind=kind) for i in range(2)]
    assert [q.wait() for q in procs] == [0, 0]
    rd = open_cache(url2, storage_options=opts)
    assert sorted(rd.sample_ids) == [r.sample_id for r in recs]
    assert verify_cache(url2, storage_options=opts).ok


def test_s3_wrong_storage_options(s3):
    _, opts = s3
    with pytest.raises(StorageError, match="s3://vlsi/rt.*no_such_option"):
        open_cache("s3://vlsi/rt", storage_options={**opts, "no_such_option": 1})
    dead = {**opts, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"connect_timeout": 1,
                                                                            "retries": {"max_attempts": 1}}}
    with pytest.raises(CacheError, match="s3://vlsi/rt"):
        open_cache("s3://vlsi/rt", storage_options=dead)
    with pytest.raises(CacheError, match="not found"):
        open_cache("s3://vlsi/missing", storage_options=opts)
