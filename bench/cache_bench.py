"""Cache throughput and size on realistic top-k log-prob data.

    python bench/cache_bench.py [--samples 1500] [--layers 8] [--k 64] [--encoding exact] [--url /tmp/x] [--json]

Data: per (answer position, layer) k ids drawn Zipf-like over a 151,936-token vocab (frequent tokens have
small ids), log-probs of a peaked power law with top-k mass uniform in [0.6, 0.99], tail = log(1 - mass).
Reports write MB/s, sequential read+decode MB/s, random sample reads, compression ratio, files on disk,
bytes per (answer token x layer) and per top-k entry. "raw" = int32 ids + fp16 values + fp32 tail + inputs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import click
import numpy as np


def make_data(n: int, L: int, k: int, vocab: int, seed: int):
    from vlsi.cache_format import SampleRecord

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    for i in range(n):
        T = int(rng.integers(300, 1000))
        A = int(rng.integers(20, 80))
        pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32)
        # Zipf-like ids: frequent tokens (small ids) dominate; the top-1 is the "answer" token
        ids = (rng.zipf(1.3, size=(A, L, k)) - 1 + rng.integers(0, 64, size=(A, L, 1))) % vocab
        s = rng.uniform(1.0, 2.5, size=(A, L, 1))
        mass = rng.uniform(0.6, 0.99, size=(A, L, 1))
        p = ranks ** -s
        p = p / p.sum(-1, keepdims=True) * mass
        yield SampleRecord(f"bench-{i:07d}", f"{i:064x}", rng.integers(0, vocab, T).astype(np.int32), pos,
                           ids.astype(np.int32), np.log(p).astype(np.float32),
                           np.log1p(-mass[..., 0]).astype(np.float32))


@click.command()
@click.option("--samples", default=1500, show_default=True)
@click.option("--layers", default=8, show_default=True, help="rows per answer position (targets + final)")
@click.option("--k", default=64, show_default=True)
@click.option("--vocab", default=151936, show_default=True)
@click.option("--random-reads", default=300, show_default=True)
@click.option("--segment-mb", default=64, show_default=True)
@click.option("--encoding", default="exact", show_default=True,
              help="value encoding (cache_format/SPEC.md section 6); bench/cache_economy.py compares them all")
@click.option("--url", default=None, help="where to write (default: a temp dir, removed afterwards)")
@click.option("--json", "as_json", is_flag=True)
def main(samples, layers, k, vocab, random_reads, segment_mb, encoding, url, as_json):
    from vlsi.cache_format import CacheWriter, Fingerprint, open_cache

    fp = Fingerprint(teacher={"name": "bench"}, verbalizers={"hash": "b"}, target_layers=tuple(range(layers - 1)),
                     tokenizer_hash="b", processor={}, vocab_size=vocab, padded_vocab_size=vocab + 128, top_k=k,
                     value_encoding=encoding)
    tmp = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="vlsi-bench-")
        url = os.path.join(tmp, "cache")
    recs = list(make_data(samples, layers, k, vocab, 0))
    raw = sum(r.topk_ids.nbytes + r.topk_ids.size * 2 + r.tail_logmass.nbytes + r.input_ids.nbytes
              + r.answer_positions.nbytes for r in recs)
    n_ans = sum(len(r.answer_positions) for r in recs)
    t0 = time.perf_counter()
    with CacheWriter(url, fp, segment_bytes=segment_mb << 20) as w:
        for r in recs:
            w.append(r)
    t_write = time.perf_counter() - t0
    del recs
    rd = open_cache(url)
    t0 = time.perf_counter()
    n = sum(1 for _ in rd.iter(prefetch=2))
    t_seq = time.perf_counter() - t0
    assert n == samples
    rd = open_cache(url)
    order = np.random.default_rng(1).integers(0, samples, random_reads)
    t0 = time.perf_counter()
    for i in order:
        rd[int(i)]
    t_rand = time.perf_counter() - t0
    disk, files = rd.bytes_on_disk(), rd.files_on_disk()
    out = {
        "device": "2-core CPU" if os.cpu_count() == 2 else f"{os.cpu_count()}-core CPU",
        "encoding": fp.value_encoding, "samples": samples, "answer_tokens": n_ans, "layers": layers, "k": k, "raw_MB": raw / 1e6,
        "write_MB_s": raw / 1e6 / t_write, "seq_read_MB_s": raw / 1e6 / t_seq,
        "random_read_ms": 1e3 * t_rand / random_reads, "random_reads_s": random_reads / t_rand,
        "bytes_on_disk": disk, "compression_ratio": raw / disk, "files_on_disk": files,
        "segments": len(rd.segments),
        "raw_bytes_per_answer_token_x_layer": raw / (n_ans * layers),
        "disk_bytes_per_answer_token_x_layer": disk / (n_ans * layers),
        "raw_bytes_per_topk_entry": 6.0, "disk_bytes_per_topk_entry": disk / (n_ans * layers * k),
    }
    if tmp:
        shutil.rmtree(tmp)
    if as_json:
        click.echo(json.dumps(out))
    else:
        for key, v in out.items():
            click.echo(f"{key:36s} {v:.3f}" if isinstance(v, float) else f"{key:36s} {v}")


if __name__ == "__main__":
    main()
