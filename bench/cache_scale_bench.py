"""Per-sample bookkeeping of the teacher cache at real scale: open time, memory and lookups at 1M samples.

    python bench/cache_scale_bench.py [--samples 1000000 | --quick] [--samples-per-segment 5000] [--out scale.json]

Writes a synthetic N-sample cache quickly (tiny records: 16 input tokens, 2 answer positions, 2 layer rows, k=4 —
the arrays are small on purpose, the point is what is kept per sample), then measures, each in a fresh
subprocess so the RSS figures are its own:

- ``open_cache`` wall and CPU time (the process's, so a busy machine inflates only the wall time) and RSS growth (``rss_MB``: with pyarrow/zarr/fsspec already imported, i.e. the
  bookkeeping itself, as in a DataLoader worker forked from a trainer; ``rss_cold_MB``: including those imports);
- the first ``get`` (opens the segment's arrays) and then random ``get``s by id (median and p90 over
  ``--gets``, default 200), plus a lookup of an absent id;
- pickling the reader (what a DataLoader worker receives) and unpickling it (a reopen).

Variants: ``v1.1`` (per-segment sample tables), ``v1.1-finalized`` (after ``vlsi-cache finalize``: one Parquet
index), and ``v1.0`` (the same arrays, hard-linked, re-committed with v1.0 commit records that list every id in
JSON: the legacy read path). Targets at 1M: open <= 0.5 s and <= 128 MB, random get <= 10 ms.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

from _device import cpu_name  # bench/_device.py: the machine a figure was measured on

TARGETS = {"open_s": 0.5, "rss_MB": 128.0, "get_median_ms": 10.0}

MEASURE = r'''
import json, os, pickle, random, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
url, warm, n_gets, seed = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
import numpy as np
import vlsi.cache_format as cf
if warm:  # the libraries a trainer has imported already
    import crc32c, fsspec, pyarrow, pyarrow.parquet, zarr
    fsspec.filesystem("file")
r0 = rss()
c0, t0 = cpu(), time.perf_counter()
rd = cf.open_cache(url)
t_open, c_open = time.perf_counter() - t0, cpu() - c0
r1 = rss()
out = {"open_s": t_open, "open_cpu_s": c_open, "rss_delta_MB": r1 - r0, "n_samples": len(rd), "n_segments": len(rd.segments),
       "format_version": rd.attrs["format_version"],
       "bookkeeping_MB": rd.samples.nbytes / 2**20 if hasattr(rd, "samples") else None}
if warm:
    rng = random.Random(seed)
    n = len(rd)
    first = rd.sample_ids[rng.randrange(n)]
    t0 = time.perf_counter(); rd.get(first); out["first_get_ms"] = 1e3 * (time.perf_counter() - t0)
    ids = [rd.sample_ids[rng.randrange(n)] for _ in range(n_gets)]
    lat = []
    for sid in ids:
        t0 = time.perf_counter(); rec = rd.get(sid); lat.append(1e3 * (time.perf_counter() - t0))
        assert rec.sample_id == sid
    lat.sort()
    out["get_median_ms"] = lat[len(lat) // 2]
    out["get_p90_ms"] = lat[int(len(lat) * 0.9)]
    t0 = time.perf_counter()
    for sid in ids:
        rd.position(sid)
    out["lookup_us"] = 1e6 * (time.perf_counter() - t0) / len(ids)
    t0 = time.perf_counter(); absent = "no-such-sample" in rd; out["absent_lookup_us"] = 1e6 * (time.perf_counter() - t0)
    assert not absent
    t0 = time.perf_counter(); blob = pickle.dumps(rd); out["pickle_bytes"] = len(blob)
    out["pickle_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter(); rd2 = pickle.loads(blob); out["unpickle_s"] = time.perf_counter() - t0
    assert len(rd2) == n
print("RESULT " + json.dumps(out))
'''


def fingerprint():
    from vlsi.cache_format import Fingerprint

    return Fingerprint(teacher={"name": "scale-bench"}, verbalizers={"hash": "bench"}, target_layers=(0,),
                       tokenizer_hash="bench", processor={}, vocab_size=32000, padded_vocab_size=32064, top_k=4,
                       tool_version="bench", created_at="2026-01-01T00:00:00+00:00")


def sample_id(i: int) -> str:
    return f"mix665k/{i:09d}"  # 17 characters, like dataset-prefixed ids


def write_cache(url: str, n: int, per_segment: int, seed: int = 0) -> dict:
    """Write n tiny samples, one committed segment of `per_segment` samples at a time (prebuilt arrays)."""
    from vlsi.cache_format import CacheWriter

    fp = fingerprint()
    L, k, T, A = fp.n_layers, fp.top_k, 16, 2
    rng = np.random.default_rng(seed)
    pos = np.array([9, 13], np.int32)
    lp = np.log(np.array([0.5, 0.2, 0.1, 0.05], np.float32))
    t0 = time.perf_counter()
    w = CacheWriter(url, fp, chunk_bytes=1 << 20, resume=False)
    for start in range(0, n, per_segment):
        m = min(per_segment, n - start)
        ids = [sample_id(i) for i in range(start, start + m)]
        hashes = [hashlib.sha256(s.encode()).hexdigest() for s in ids]
        data = {
            "input_ids": rng.integers(0, fp.vocab_size, m * T, dtype=np.int32),
            "input_offsets": np.arange(m + 1, dtype=np.int64) * T,
            "answer_positions": np.tile(pos, m),
            "answer_offsets": np.arange(m + 1, dtype=np.int64) * A,
            "topk_ids": (rng.integers(0, fp.vocab_size - k, (m * A, L, 1), dtype=np.int32)
                         + np.arange(k, dtype=np.int32)),
            "topk_logprobs": np.broadcast_to(lp, (m * A, L, k)).astype(np.float16),
            "tail_logmass": np.full((m * A, L), np.log(0.15), np.float32),
        }
        w._commit_segment_arrays(data, ids, hashes, np.full(m, T), np.full(m, A))
    w.close()
    return {"write_s": time.perf_counter() - t0, "segments": len(w.segments)}


def _link_tree(src: str, dst: str, skip=()) -> None:
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        if rel.split(os.sep)[0] in skip:
            continue
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            os.link(os.path.join(root, f), os.path.join(dst, rel, f))


def make_v1_0(src: str, dst: str) -> float:
    """The same arrays (hard links) committed the v1.0 way: a 1.0 root, commit records listing every id."""
    from vlsi.cache_format import layout
    from vlsi.cache_format.commit import visible_set, write_commit
    from vlsi.cache_format.migrations import root_attrs
    from vlsi.cache_format.samples import read_table
    from vlsi.cache_format.store import Location

    t0 = time.perf_counter()
    loc_src = Location(src)
    vis = visible_set(loc_src)
    _link_tree(os.path.join(src, layout.PARTS), os.path.join(dst, layout.PARTS))
    loc = Location(dst, read_only=False)
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {layout.ROOT_ATTR: root_attrs(fingerprint().to_dict(), (1, 0))}}
    loc.write_bytes("zarr.json", json.dumps(meta, indent=1).encode())
    for seg in vis.segments:
        seg.columns = read_table(loc_src, seg.table, seg.key)
        seg.version, seg.table = (1, 0), None
        write_commit(loc, seg)
        seg.columns = None
    return time.perf_counter() - t0


def measure(url: str, warm: bool, gets: int) -> dict:
    p = subprocess.run([sys.executable, "-c", MEASURE, url, "1" if warm else "0", str(gets), "1"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise click.ClickException(f"measuring {url} failed:\n{p.stderr[-3000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def du_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


@click.command()
@click.option("--samples", default=1_000_000, show_default=True, help="samples in the synthetic cache")
@click.option("--quick", is_flag=True, help="20k samples (a smoke run)")
@click.option("--samples-per-segment", default=5000, show_default=True,
              help="samples per committed segment (a 72B teacher with --commit-seconds 300: ~1-5k)")
@click.option("--gets", default=200, show_default=True, help="random gets timed per variant")
@click.option("--v10/--no-v10", default=True, show_default=True, help="also measure the v1.0 read path")
@click.option("--dir", "workdir", default=None, help="where to write the caches (default: a temp dir, removed)")
@click.option("--out", default=None, help="write the results as JSON here")
def main(samples, quick, samples_per_segment, gets, v10, workdir, out):
    """Open time, RSS and lookup latency of caches of --samples samples, per format version."""
    from vlsi.cache_format import finalize

    n = 20_000 if quick else samples
    tmp = None
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix="vlsi-scale-")
    os.makedirs(workdir, exist_ok=True)
    res = {"device": cpu_name(), "python": platform.python_version(), "samples": n,
           "load_average_before": os.getloadavg(),
           "samples_per_segment": samples_per_segment, "targets_at_1M": TARGETS, "variants": {}}
    try:
        url = os.path.join(workdir, "v1_1")
        click.echo(f"writing {n} samples to {url} ...", err=True)
        res["write"] = write_cache(url, n, samples_per_segment)
        res["write"]["disk_MB"] = du_mb(url)
        click.echo(f"  {res['write']['write_s']:.1f} s, {res['write']['segments']} segments", err=True)
        urls = {"v1.1": url}
        fin = os.path.join(workdir, "v1_1_finalized")
        _link_tree(url, fin)
        t0 = time.perf_counter()
        finalize(fin)
        res["write"]["finalize_s"] = time.perf_counter() - t0
        urls["v1.1-finalized"] = fin
        if v10:
            old = os.path.join(workdir, "v1_0")
            res["write"]["make_v1_0_s"] = make_v1_0(url, old)
            urls["v1.0"] = old
        if hasattr(os, "sync"):
            os.sync()  # flush the fresh caches first: writeback running under a measurement slows it down
        for name, u in urls.items():
            click.echo(f"measuring {name} ...", err=True)
            d = measure(u, True, gets)
            d["rss_MB"] = d.pop("rss_delta_MB")
            d["rss_cold_MB"] = measure(u, False, gets)["rss_delta_MB"]
            d["commit_record_bytes"] = os.path.getsize(
                next(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(u, "commits")) for f in fs))
            res["variants"][name] = d
        res["load_average_after"] = os.getloadavg()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo(format_table(res))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        click.echo(f"wrote {out}")


def format_table(res: dict) -> str:
    cols = [("open_s", "open s", "{:.3f}"), ("open_cpu_s", "open CPU s", "{:.3f}"), ("rss_MB", "RSS MB", "{:.1f}"), ("rss_cold_MB", "RSS+imports MB", "{:.1f}"),
            ("first_get_ms", "1st get ms", "{:.2f}"), ("get_median_ms", "get p50 ms", "{:.2f}"),
            ("get_p90_ms", "get p90 ms", "{:.2f}"), ("lookup_us", "lookup us", "{:.1f}"),
            ("pickle_bytes", "pickle B", "{:d}"), ("unpickle_s", "unpickle s", "{:.3f}"),
            ("commit_record_bytes", "commit rec B", "{:d}")]
    w = res["write"]
    la = res.get("load_average_before"), res.get("load_average_after")
    lines = [f"device: {res['device']}; load average {la[0][0]:.1f} before, {la[1][0]:.1f} after "
             f"(wall times inflate when the machine is shared; CPU time does not)" if la[1] else
             f"device: {res['device']}",
             f"{res['samples']:,} samples, {w['segments']} segments of {res['samples_per_segment']:,}; "
             f"written in {w['write_s']:.1f} s ({w['disk_MB']:.0f} MB on disk), finalize {w['finalize_s']:.1f} s",
             "| variant | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, d in res["variants"].items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(d[k]) if d.get(k) is not None else "-"
                                                  for k, _, fmt in cols) + " |")
    if res["samples"] >= 1_000_000:
        for name, d in res["variants"].items():
            bad = [f"{k} {d[k]:.3g} > {v}" for k, v in TARGETS.items() if d.get(k) is not None and d[k] > v]
            lines.append(f"{name}: {'meets the targets' if not bad else 'misses ' + ', '.join(bad)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
