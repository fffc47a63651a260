"""Cache economy: bytes per row, error and decode speed of each value encoding / target type.

    python bench/cache_economy.py [--samples 200] [--answers 40] [--layers 21] [--k 64] [--json]
    python bench/cache_economy.py --demo-run DIR      # a `vlsi-demo --out DIR` run: its DIR/cache instead

A *row* is one (answer token, layer) pair: what the format's size target (<= 24 B per row) is stated in.

Synthetic data (the default): 152k-token vocabulary; per answer position a pool of 256 candidate ids drawn
Zipf-like (frequent tokens have small ids), and per layer logits over the pool that drift from layer to layer
(a random walk: adjacent layers share most of their top-k, as verbalized teacher layers do) and sharpen with depth
(shallow layers are flat, the final head peaked); the rest of the vocabulary holds a tail mass. The `exact` top-k
cache (int32 ids + fp16 log-probs, today's format) is written first; every other encoding is made from it with
`vlsi-cache derive` (exactly what a consumer of a shared cache would do), and sampled targets are drawn from the
synthetic full distributions (draws outside the pool land on random tail tokens).

Columns: `B/row` = the cache's bytes on disk (all arrays: inputs, offsets, tables) / rows; `ratio` = exact's B/row
over this one's (measured in the same run); `KL mean` / `KL p99` = `vlsi.cache_format.stats.row_kl`
(KL(exact || encoded), tails read as uniform over unlisted tokens, so truncation is charged) over all rows;
`kept` = present entries per row; `decode MB/s` = decoded bytes (int32 ids + fp32 log-probs + fp32 tail
[+ counts]) per second of a sequential `iter()` over the whole cache (read + crc + blosc + encoding decode), on
this machine (its CPU count is printed; run it under `taskset -c 0,1` for the 2-core figure). Sampled targets have
no KL column: they are an unbiased estimate, not an approximation of the distribution (tests/ops/test_sampled_kl.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ENCODINGS = ("topk1-plain-q8", "topk1-sorted-q8", "topk1-prev-q8", "topk1-prevd-q8", "topk1-prevd-dq8", "topk1-prevd-dq6",
             "topk1-prevd-dq8-m1e-2", "topk1-prevd-dq8-kl1e-3", "topk1-prevd-dq8-kl3e-3", "topk1-prevd-dq8-kl1e-2",
             "topk1-prevd-dq6-kl3e-3", "topk1-sorted-q8-kl3e-3")


def _fingerprint(L: int, k: int, vocab: int, **kw):
    from vlsi.cache_format import Fingerprint

    return Fingerprint(teacher={"name": "bench-economy"}, verbalizers={"hash": "b"}, target_layers=tuple(range(L - 1)),
                       tokenizer_hash="b", processor={}, vocab_size=vocab, padded_vocab_size=vocab + 128, top_k=k,
                       tool_version="bench", created_at="2026-01-01T00:00:00+00:00", **kw)


def synthetic_rows(rng, A: int, L: int, vocab: int, pool: int = 256):
    """Full distributions of A answer positions x L layers, as (pool ids [A, pool], pool log-probs [A, L, pool],
    tail log-mass [A, L]) where the tail is spread uniformly over the other vocab - pool tokens."""
    ids = np.empty((A, pool), np.int64)
    for a in range(A):
        # Zipf-like distinct ids: frequent tokens (small ids) dominate
        cand = np.unique((rng.zipf(1.2, size=pool * 4) - 1 + rng.integers(0, 2000)) % vocab)
        extra = rng.choice(vocab, pool, replace=False)
        ids[a] = np.concatenate([rng.permutation(cand), extra[~np.isin(extra, cand)]])[:pool]
    base = rng.standard_normal((A, 1, pool))
    # layer-to-layer drift: a random walk, so adjacent layers keep most of their top-k
    walk = np.cumsum(rng.standard_normal((A, L, pool)) * 0.25, axis=1)
    depth = np.linspace(0.0, 1.0, L)[None, :, None]
    sharp = 0.9 + 2.6 * depth * rng.uniform(0.7, 1.3, (A, 1, 1))  # shallow flat, deep peaked
    z = sharp * (base + walk * (1.2 - depth))
    tail_mass = np.clip(rng.beta(1.2, 12.0, (A, L)) * (1.1 - depth[..., 0]), 1e-6, 0.6)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True)) + np.log1p(-tail_mass)[..., None]
    return ids, lp, np.log(tail_mass)


def make_synthetic(n: int, A: int, L: int, k: int, vocab: int, seed: int, samples_per_row: tuple[int, ...]):
    """(exact top-k records, {N: sampled records}) for n samples."""
    from vlsi.cache_format import SampleRecord

    rng = np.random.default_rng(seed)
    exact, sampled = [], {N: [] for N in samples_per_row}
    for i in range(n):
        T = int(rng.integers(A + 20, A + 400))
        pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32)
        inp = rng.integers(0, vocab, T).astype(np.int32)
        pids, plp, ptail = synthetic_rows(rng, A, L, vocab)
        order = np.argsort(-plp, axis=-1)[..., :k]
        tk_lp = np.take_along_axis(plp, order, -1)
        tk_ids = np.take_along_axis(np.broadcast_to(pids[:, None], plp.shape), order, -1)
        tail = np.log1p(-np.exp(tk_lp).sum(-1))
        sid, ch = f"bench-{i:07d}", f"{i:064x}"
        exact.append(SampleRecord(sid, ch, inp, pos, tk_ids.astype(np.int32), tk_lp.astype(np.float32),
                                  tail.astype(np.float32)))
        for N in samples_per_row:
            sampled[N].append(SampleRecord(sid, ch, inp, pos, *_draw(rng, pids, plp, ptail, N, vocab)))
    return exact, sampled


def _draw(rng, pids, plp, ptail, N: int, vocab: int):
    """N draws per row from pool + tail (a tail draw is a uniform token outside the pool), as distinct ids in
    descending log-prob with counts; log-probs are the full distribution's."""
    A, L, P = plp.shape
    ids = np.zeros((A, L, N), np.int32)
    lps = np.full((A, L, N), -np.inf, np.float32)
    cnt = np.zeros((A, L, N), np.int32)
    tails = np.zeros((A, L), np.float32)
    log_u = ptail - np.log(vocab - P)  # per tail token
    for a in range(A):
        pool = set(pids[a].tolist())
        for layer in range(L):
            p = np.append(np.exp(plp[a, layer]), np.exp(ptail[a, layer]))
            c = rng.multinomial(N, p / p.sum())
            got = {int(pids[a, j]): (float(plp[a, layer, j]), int(c[j])) for j in np.flatnonzero(c[:P])}
            for _ in range(int(c[P])):
                t = int(rng.integers(vocab))
                while t in pool:
                    t = int(rng.integers(vocab))
                lp0, c0 = got.get(t, (float(log_u[a, layer]), 0))
                got[t] = (lp0, c0 + 1)
            ent = sorted(got.items(), key=lambda kv: -kv[1][0])
            for j, (t, (lp0, c0)) in enumerate(ent):
                ids[a, layer, j], lps[a, layer, j], cnt[a, layer, j] = t, lp0, c0
            tails[a, layer] = np.log1p(-min(np.exp(lps[a, layer, :len(ent)].astype(np.float64)).sum(), 1 - 1e-7))
    return ids, lps, tails, cnt


def _write(url: str, fp, recs) -> None:
    from vlsi.cache_format import CacheWriter

    with CacheWriter(url, fp) as w:
        for r in recs:
            w.append(r)


def measure(url: str, ref_url: str | None, L: int) -> dict:
    """B/row, KL to the reference, kept entries, sequential read+decode MB/s of the cache at url."""
    from vlsi.cache_format import open_cache
    from vlsi.cache_format.stats import kl_vs_reference

    rd = open_cache(url)
    n_rows = rd.n_answer_tokens * rd.fingerprint.n_layers
    t0 = time.perf_counter()
    dec = kept = 0
    for rec in rd.iter(prefetch=2):
        dec += rec.topk_ids.size * 8 + rec.tail_logmass.nbytes + (rec.sample_counts.nbytes if rec.sample_counts
                                                                  is not None else 0)
        kept += int(np.isfinite(rec.topk_logprobs).sum())
    t = time.perf_counter() - t0
    out = {"encoding": rd.fingerprint.value_encoding, "targets": rd.fingerprint.targets,
           "k": rd.fingerprint.top_k, "B_per_row": rd.bytes_on_disk() / n_rows,
           "kept_per_row": kept / n_rows, "decode_MB_s": dec / 1e6 / t, "decoded_MB": dec / 1e6}
    if ref_url is not None and rd.fingerprint.targets == "topk":
        import numpy as _np

        kl = kl_vs_reference(rd, open_cache(ref_url))
        out["kl_mean"] = kl["kl_mean"]
        per = [r["kl_mean"] for r in kl["per_layer"]]
        out["kl_worst_layer"] = float(_np.max(per))
        out["kl_p99_max"] = max(r["kl_p99"] for r in kl["per_layer"])
    return out


def _overlap(recs) -> float:
    """Mean fraction of a layer row's top-k ids that the previous layer row (same position) also lists."""
    fr = []
    for r in recs:
        ids = r.topk_ids
        for layer in range(1, ids.shape[1]):
            a, b = ids[:, layer], ids[:, layer - 1]
            fr.append(((a[:, :, None] == b[:, None, :]).any(-1)).mean())
    return float(np.mean(fr))


def table(rows: list[dict]) -> str:
    base = next(r["B_per_row"] for r in rows if r["encoding"] == "fp16-logprob" and r["targets"] == "topk")
    head = f"| encoding | targets | k | B/row | ratio vs exact | KL mean (nats) | worst layer KL | kept/row | decode MB/s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl_mean']:.2e}" if r.get("kl_mean") is not None else "-"
        wl = f"{r['kl_worst_layer']:.2e}" if r.get("kl_worst_layer") is not None else "-"
        lines.append(f"| {r['encoding']} | {r['targets']} | {r['k']} | {r['B_per_row']:.1f} | "
                     f"{base / r['B_per_row']:.1f}x | {kl} | {wl} | {r['kept_per_row']:.1f} | {r['decode_MB_s']:.0f} |")
    return "\n".join(lines)


@click.command()
@click.option("--samples", default=200, show_default=True)
@click.option("--answers", default=40, show_default=True, help="answer positions per sample")
@click.option("--layers", default=21, show_default=True, help="rows per answer position (targets + final)")
@click.option("--k", default=64, show_default=True)
@click.option("--vocab", default=151936, show_default=True)
@click.option("--samples-per-row", "spr", default="12,24", show_default=True, help="sampled-target draws to bench")
@click.option("--encodings", default=",".join(ENCODINGS), show_default=True)
@click.option("--demo-run", default=None, metavar="DIR", help="a vlsi-demo --out DIR run: bench DIR/cache instead")
@click.option("--workdir", default=None, help="where to write the caches (default: a temp dir, removed)")
@click.option("--json", "as_json", is_flag=True)
def main(samples, answers, layers, k, vocab, spr, encodings, demo_run, workdir, as_json):
    from _device import cpu_name

    from vlsi.cache_format import open_cache
    from vlsi.cache_format.derive import derive

    tmp = tempfile.mkdtemp(prefix="vlsi-economy-", dir=workdir)
    encs = [e for e in encodings.split(",") if e]
    rows: list[dict] = []
    try:
        if demo_run is not None:
            exact = os.path.join(demo_run, "cache")
            if not os.path.exists(os.path.join(exact, "zarr.json")):
                raise click.ClickException(f"{demo_run}: no cache at {exact} (give a vlsi-demo --out DIR)")
            src = open_cache(exact)
            info = {"source": exact, "n_answer_tokens": src.n_answer_tokens, "layers": src.fingerprint.n_layers,
                    "k": src.fingerprint.top_k, "vocab": src.fingerprint.vocab_size,
                    "overlap_prev_layer": _overlap(list(src.iter()))}
        else:
            t0 = time.perf_counter()
            recs, sampled = make_synthetic(samples, answers, layers, k, vocab, 0,
                                           tuple(int(x) for x in spr.split(",") if x))
            exact = os.path.join(tmp, "exact")
            _write(exact, _fingerprint(layers, k, vocab), recs)
            info = {"source": "synthetic", "samples": samples, "answers": answers, "layers": layers, "k": k,
                    "vocab": vocab, "overlap_prev_layer": _overlap(recs),
                    "top_k_mass_mean": float(np.mean([1 - np.exp(r.tail_logmass).mean() for r in recs])),
                    "gen_s": time.perf_counter() - t0}
            for N, srecs in sampled.items():
                for se in ("topk1-plain-q8", "topk1-prevd-dq8"):
                    url = os.path.join(tmp, f"sampled{N}-{se}")
                    _write(url, _fingerprint(layers, N, vocab, targets="sampled", samples_per_row=N,
                                             value_encoding=se), srecs)
                    rows.append(measure(url, None, layers))
                    shutil.rmtree(url, ignore_errors=True)
            del recs, sampled
        rows.insert(0, measure(exact, exact, layers))
        for e in encs:
            url = os.path.join(tmp, e)
            derive(exact, url, encoding=e)
            rows.append(measure(url, exact, layers))
            shutil.rmtree(url, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"device": cpu_name(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "data": info,
           "rows": rows}
    if as_json:
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(json.dumps({k_: v for k_, v in out.items() if k_ != "rows"}))
        click.echo(table(rows))


if __name__ == "__main__":
    main()
