"""Pure pieces of the extraction loop: batching, config parsing, the background writer, layer_topk."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlsi.extract.batching import length_batches, padding_fraction
from vlsi.common.config import parse_kv
from vlsi.extract.config import ConfigError, ExtractConfig, parse_shard
from vlsi.extract.writer_thread import BackgroundWriter


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=60), st.one_of(st.none(), st.integers(1, 9)),
       st.one_of(st.none(), st.integers(1, 900)))
def test_length_batches_partition_and_limits(lengths, bs, cap):
    if bs is None and cap is None:
        bs = 4
    batches = length_batches(lengths, batch_size=bs, max_tokens_per_batch=cap)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    for b in batches:
        assert b
        if bs is not None:
            assert len(b) <= bs
        if cap is not None and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= cap
    # longest first, and deterministic
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    assert batches == length_batches(lengths, batch_size=bs, max_tokens_per_batch=cap)


def test_bucketing_reduces_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(256)]
    bucketed = length_batches(lengths, batch_size=8)
    naive = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    assert padding_fraction(lengths, bucketed) < 0.05 < padding_fraction(lengths, naive)


def test_parsers():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    base = dict(teacher="t", verbalizers="v", data="d.json", out="o")
    assert ExtractConfig(**base, layers="10, 2,6,2").layers == (2, 6, 10) and ExtractConfig(**base).layers is None
    with pytest.raises(ConfigError, match="--layers"):
        ExtractConfig(**base, layers="2,x")
    assert parse_kv(["anon=false", "client_kwargs.endpoint_url=http://h:9", "key=abc", "n=3"]) == {
        "anon": False, "client_kwargs": {"endpoint_url": "http://h:9"}, "key": "abc", "n": 3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_kv(["novalue"])


def test_config_checks():
    base = dict(teacher="t", verbalizers="v", data="d.json", out="o")
    assert ExtractConfig(**base).batch_size == 8
    assert ExtractConfig(**base, max_tokens_per_batch=512).batch_size is None
    for kw, word in [(dict(top_k=0), "--top-k"), (dict(dtype="fp8"), "--dtype"), (dict(on_bad_sample="x"), "bad-sample"),
                     (dict(backend="onnx"), "--backend"), (dict(device_map="balanced"), "--device-map"),
                     (dict(batch_size=0), "--batch-size")]:
        with pytest.raises(ConfigError, match=word):
            ExtractConfig(**base, **kw)
    d = ExtractConfig(**base, storage_options={"secret": "s3cr3t"}).to_dict()
    assert "s3cr3t" not in str(d)


class _SlowWriter:
    def __init__(self, delay=0.0, fail_at=None):
        self.got, self.delay, self.fail_at = [], delay, fail_at

    def append(self, rec):
        if self.fail_at is not None and len(self.got) == self.fail_at:
            raise ValueError("disk full")
        time.sleep(self.delay)
        self.got.append(rec)


def test_background_writer_order_and_backpressure():
    w = _SlowWriter(delay=0.01)
    with BackgroundWriter(w, max_items=2) as bg:
        t0 = time.perf_counter()
        for i in range(10):
            bg.put([i])
        # 10 items, 2 buffered: put had to wait for the slow writer (back-pressure, not unbounded memory)
        assert time.perf_counter() - t0 > 0.04
    assert w.got == list(range(10))
    assert bg.blocked_s > 0 and bg.n_records == 10


def test_background_writer_propagates_errors():
    w = _SlowWriter(fail_at=3)
    bg = BackgroundWriter(w, max_items=1)
    with pytest.raises(ValueError, match="disk full"):
        for i in range(50):
            bg.put([i])
        bg.close()
    assert w.got == [0, 1, 2] and bg.failed  # nothing appended after the failure
    with pytest.raises(ValueError, match="disk full"):
        bg.close()


def test_background_writer_commits_when_due_while_idle():
    """--commit-seconds: an idle writer thread still asks the writer to commit what is due."""
    class Timed(_SlowWriter):
        due = 0

        def commit_if_due(self):
            self.due += 1

    w = Timed()
    with BackgroundWriter(w, tick_s=0.02) as bg:
        bg.put([1])
        time.sleep(0.25)
    assert w.got == [1] and w.due >= 3


def test_commit_seconds_reaches_the_cache_writer(tmp_path):
    from vlsi.cache_format import Fingerprint
    from vlsi.extract.run import open_writer

    base = dict(teacher="t", verbalizers="v", data="d.json", out=str(tmp_path / "c"))
    assert ExtractConfig(**base).commit_seconds == 300.0
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="--commit-seconds"):
            ExtractConfig(**base, commit_seconds=bad)
    fp = Fingerprint(teacher={"name": "t"}, verbalizers={"hash": "v"}, target_layers=(0,), tokenizer_hash="x",
                     processor={}, vocab_size=10, padded_vocab_size=16, top_k=2)
    with open_writer(ExtractConfig(**base, commit_seconds=0.5), fp) as w:
        assert w.commit_seconds == 0.5 and w.commit_every is None


def test_background_writer_converts_in_its_thread():
    seen = []

    class Item:
        def to_records(self):
            seen.append(threading.current_thread().name)
            return ["r"]

    w = _SlowWriter()
    with BackgroundWriter(w, name="bgw") as bg:
        bg.put(Item())
    assert seen == ["bgw"] and w.got == ["r"]


def test_layer_topk_chunked_equals_dense():
    """compute.layer_topk == dense log_softmax/topk over the real vocab, layers in order, final last."""
    from vlsi.extract.compute import HeadSpec, layer_topk

    g = torch.Generator().manual_seed(0)
    R, d, V, Vp, k = 7, 16, 50, 64, 5
    W = torch.randn(Vp, d, generator=g) * 0.3
    W[V:] = 1e3  # padded rows must never be read
    hs = {3: torch.randn(R, d, generator=g), 1: torch.randn(R, d, generator=g)}
    fin = torch.randn(R, d, generator=g)
    norm = torch.nn.LayerNorm(d, elementwise_affine=False)
    verb = {1: torch.nn.Linear(d, d), 3: torch.nn.Linear(d, d)}
    out = layer_topk(hs, fin, layers=[3, 1], verbalizer=lambda i, h: verb[i](h), head=HeadSpec(norm, W, V), k=k)
    assert out.ids.shape == (R, 3, k) and out.tail.shape == (R, 3)
    with torch.no_grad():
        xs = [norm(verb[1](hs[1])), norm(verb[3](hs[3])), fin]
    for l, x in enumerate(xs):
        lp = torch.log_softmax((x @ W[:V].T).double(), -1)
        v, i = lp.topk(k)
        torch.testing.assert_close(out.logprobs[:, l].double(), v, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.ids[:, l].long(), i)
        torch.testing.assert_close(out.tail[:, l].double(), torch.log1p(-v.exp().sum(-1)), atol=1e-4, rtol=1e-3)
        # (fp32 tail: log(1 - m) is ill-conditioned as m -> 1, hence the looser tolerance)
