"""Shared test helpers for tests/cache_format: fingerprints and realistic random records."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from vlsi.cache_format import Fingerprint, SampleRecord


def make_fp(*, layers=(1, 3), k=4, vocab=100, padded=128, **kw) -> Fingerprint:
    base = dict(teacher={"name": "tiny-teacher", "config_hash": "c0ffee", "num_layers": 4},
                verbalizers={"hash": "v1", "kind": "verb-ffn", "layers": list(layers)},
                target_layers=tuple(layers), tokenizer_hash="tok123", processor={"patch_size": 14},
                vocab_size=vocab, padded_vocab_size=padded, top_k=k, tool_version="test",
                created_at="2025-01-01T00:00:00Z")
    base.update(kw)
    return Fingerprint(**base)


#: the cache kinds every guarantee (resume, shards, S3, corruption, compaction) is tested for: a top-k cache and a
#: features-only cache (vlsi-extract --hidden-states all without --verbalizers: the final head's top-k, L = 1)
KINDS = {"topk": {}, "features": dict(layers=(), verbalizers={"hash": "", "kind": "none", "layers": []},
                                      hidden_states="all", hidden_size=24)}


def make_kind_fp(kind: str, **kw) -> Fingerprint:
    return make_fp(**{**KINDS[kind], **kw})


def make_record(rng: np.random.Generator, sid: str, fp: Fingerprint, *, T: int | None = None,
                A: int | None = None) -> SampleRecord:
    """A record with peaked log-probs (descending, top-k mass < 1) and a matching tail log-mass; with the
    fingerprint's hidden states (bf16 bit patterns of N(0, 1) values) when it stores them."""
    T = int(rng.integers(2, 40)) if T is None else T
    A = int(rng.integers(0, T)) if A is None else min(A, T - 1)
    L, k = fp.n_layers, fp.top_k
    pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32) if A else np.zeros(0, np.int32)
    ids = np.stack([[rng.choice(fp.vocab_size, k, replace=False) for _ in range(L)] for _ in range(A)]) \
        if A else np.zeros((0, L, k), np.int64)
    logits = -np.sort(-rng.standard_normal((A, L, k + 1)) * 3, axis=-1)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # last column = the tail bucket
    lp = np.log(p[..., :k]).astype(np.float32)
    tail = np.log1p(-p[..., :k].sum(-1)).astype(np.float32)
    rec = SampleRecord(sid, f"hash-{sid}", rng.integers(0, fp.vocab_size, T).astype(np.int32), pos,
                       ids.astype(np.int32), lp, tail)
    if fp.hidden_states != "none":
        from vlsi.cache_format.features import bf16_bits, n_question_rows

        d = fp.hidden_size
        rec.hidden_answer = bf16_bits(rng.standard_normal((A, d)).astype(np.float32))
        if fp.hidden_states == "all":
            rec.hidden_question = bf16_bits(rng.standard_normal((n_question_rows(pos, T), d)).astype(np.float32))
    return rec


def make_records(n: int, seed: int, fp: Fingerprint, prefix: str = "s") -> list[SampleRecord]:
    rng = np.random.default_rng(seed)
    return [make_record(rng, f"{prefix}{i:05d}", fp) for i in range(n)]


def assert_same(a: SampleRecord, b: SampleRecord) -> None:
    """b was stored as fp16: log-probs agree to fp16 rounding, everything else exactly."""
    assert a.sample_id == b.sample_id and a.content_hash == b.content_hash
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.answer_positions, b.answer_positions)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.topk_logprobs.astype(np.float16).astype(np.float32), b.topk_logprobs)
    np.testing.assert_array_equal(a.tail_logmass, b.tail_logmass)
    assert b.input_ids.dtype == np.int32 and b.topk_ids.dtype == np.int32
    assert b.topk_logprobs.dtype == np.float32 and b.tail_logmass.dtype == np.float32
    for x, y in ((a.hidden_answer, b.hidden_answer), (a.hidden_question, b.hidden_question)):
        assert (x is None) == (y is None)
        if x is not None:  # bf16 bit patterns: exact
            assert y.dtype == np.uint16
            np.testing.assert_array_equal(x, y)


HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    from cache_helpers import make_kind_fp, make_records
    from vlsi.cache_format import CacheWriter
    fp = make_kind_fp({kind!r}, k=8)
    recs = make_records(40, 11, fp)
    shard = ({i}, {n})
    w = CacheWriter({url!r}, fp, shard=shard, storage_options={so!r}, commit_every=5, chunk_bytes=256)
    for j, r in enumerate(recs):
        if j % shard[1] != shard[0]:
            continue
        if w.append(r):
            print("appended", j, flush=True)
            time.sleep({sleep})
    w.close()
    print("done", flush=True)
""")


def child_writer(url, i=0, n=1, sleep=0.0, so=None, kind="topk"):
    """A writer subprocess: shard (i, n) of make_records(40, 11) of a `kind` cache, commit_every=5; prints each
    append."""
    code = CHILD.format(here=HERE, url=url, i=i, n=n, sleep=sleep, so=so, kind=kind)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


