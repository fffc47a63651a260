"""Cache economy: bytes per row, error and decode speed of each value encoding / target type.

    python bench/cache_economy.py [--samples 200] [--answers 40] [--layers 21] [--k 64] [--profile flat|CACHE|JSON]
    python bench/cache_economy.py --demo-run DIR [--sampled-cache S] [--students 0,1,2 --workdir W]

A *row* is one (answer token, layer) pair: what the format's size target (<= 24 B per row) is stated in.

Synthetic data (the default): 152k-token vocabulary, rows from bench/_teacher_profile.py's generator (a pool of
256 Zipf-like candidate ids per answer position, logits drifting along depth as a Brownian motion so adjacent layers
share most of their top-k, a tail mass over the rest of the vocabulary). ``--profile`` sets the per-layer profile:
``flat`` (round 1's generator: average top-64 mass 0.85) or a profile fitted to a teacher cache's measured per-layer
statistics (``bench/profiles/demo-teacher.json``: the demo teacher's; see that module for what is fitted and how).
The per-layer profile of the data benched (measured on its exact cache) is printed above the table. The `exact`
top-k cache (int32 ids + fp16 log-probs) is written first; every other encoding is made from it with
`vlsi-cache derive` (what a consumer of a shared cache would do); sampled targets are drawn from the synthetic full
distributions (draws outside the pool land on random tail tokens).

``--demo-run DIR``: the same table on a `vlsi-demo --out DIR` run's teacher cache, with its measured profile
(``--save-profile`` writes it). ``--students SEEDS`` (with ``--demo-run``): train the demo's VLsI student arm
(``vlsi.demo.pipeline.train_arm``: the run's config, budget and student start) from exact, each
``--student-encodings`` cache and ``--sampled-cache``, per seed, and add the test accuracy (mean +- sample std, per
seed) as a column, and with ``--heldout-cache`` (an exact cache of the teacher on the test split) the students'
held-out final-head KL to the teacher; finished runs in ``WORKDIR/students`` are read back.

Columns: `B/row` = the cache's bytes on disk (all arrays: inputs, offsets, tables) / rows; `ratio` = exact's B/row
over this one's (measured in the same run); `KL mean` / `KL p99` = `vlsi.cache_format.stats.row_kl`
(KL(exact || encoded), tails read as uniform over unlisted tokens, so truncation is charged) over all rows;
`kept` = present entries per row; `decode MB/s` = decoded bytes (int32 ids + fp32 log-probs + fp32 tail
[+ counts]) per second of a sequential `iter()` over the whole cache (read + crc + blosc + encoding decode), on
this machine (its CPU count and load are printed; run it under `taskset -c 0,1` for the 2-core figure). Sampled
targets have no KL column: they are an unbiased estimate, not an approximation of the distribution
(tests/ops/test_sampled_kl.py).
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
from _teacher_profile import fit_profile, measure_profile, synthetic_rows  # noqa: E402

ENCODINGS = ("topk1-plain-q8", "topk1-sorted-q8", "topk1-prev-q8", "topk1-prevd-q8", "topk1-prevd-dq8", "topk1-prevd-dq6",
             "topk1-prevd-dq8-m1e-2", "topk1-prevd-dq8-kl1e-3", "topk1-prevd-dq8-kl3e-3", "topk1-prevd-dq8-kl1e-2",
             "topk1-prevd-dq6-kl3e-3", "topk1-sorted-q8-kl3e-3")


def _fingerprint(L: int, k: int, vocab: int, **kw):
    from vlsi.cache_format import Fingerprint

    return Fingerprint(teacher={"name": "bench-economy"}, verbalizers={"hash": "b"}, target_layers=tuple(range(L - 1)),
                       tokenizer_hash="b", processor={}, vocab_size=vocab, padded_vocab_size=vocab + 128, top_k=k,
                       tool_version="bench", created_at="2026-01-01T00:00:00+00:00", **kw)


def make_synthetic(n: int, A: int, L: int, k: int, vocab: int, seed: int, samples_per_row: tuple[int, ...],
                   profile: dict | None = None):
    """(exact top-k records, {N: sampled records}) for n samples; ``profile``: None (flat) or a fitted profile
    (bench/_teacher_profile.py)."""
    from vlsi.cache_format import SampleRecord

    rng = np.random.default_rng(seed)
    exact, sampled = [], {N: [] for N in samples_per_row}
    for i in range(n):
        T = int(rng.integers(A + 20, A + 400))
        pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32)
        inp = rng.integers(0, vocab, T).astype(np.int32)
        pids, plp, ptail = synthetic_rows(rng, A, L, vocab, profile)
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
        if not ids.shape[0]:
            continue
        for layer in range(1, ids.shape[1]):
            a, b = ids[:, layer], ids[:, layer - 1]
            fr.append(((a[:, :, None] == b[:, None, :]).any(-1)).mean())
    return float(np.mean(fr)) if fr else None


def profile_table(prof: dict) -> str:
    """The per-layer profile (bench/_teacher_profile.py) as a markdown table."""
    lines = ["| layer | depth | top-1 p10 / p50 / p90 | top-k mass p10 / p50 | cum. mass top-4 p50 | entropy (nats) | "
             "overlap with prev. row |", "|---|---|---|---|---|---|---|"]
    qi = {q: i for i, q in enumerate(prof["quantiles"])}
    for r in prof["layers"]:
        t, c = r["top1_q"], r["coverage_q"]
        ov = f"{r['overlap_prev']:.3f}" if r["overlap_prev"] is not None else "-"
        lines.append(f"| {r['layer']} | {r['depth']:.2f} | {t[qi[0.1]]:.3f} / {t[qi[0.5]]:.3f} / {t[qi[0.9]]:.3f} | "
                     f"{c[qi[0.1]]:.3f} / {c[qi[0.5]]:.3f} | {r['cum4_p50']:.3f} | {r['entropy_lb']:.3f} | {ov} |")
    return "\n".join(lines)


def _load_profile(spec: str) -> dict | None:
    """``flat`` -> None; a cache directory -> its measured profile, fitted; a JSON file -> a measured profile
    (``measure_profile``'s output, e.g. written by ``--save-profile``), fitted."""
    if spec == "flat":
        return None
    if os.path.isdir(spec):
        from vlsi.cache_format import open_cache

        measured = measure_profile(open_cache(spec))
    else:
        with open(spec) as f:
            measured = json.load(f)
    fit = fit_profile(measured)
    fit["measured"] = measured
    return fit


# ---- student study ----------------------------------------------------------------------------------------------
def student_study(demo_run: str, caches: dict[str, str], seeds: list[int], outdir: str, log=print,
                  heldout_cache: str | None = None) -> dict:
    """Train the demo's VLsI student arm (vlsi.demo.pipeline.train_arm, the run's own config and budget, from its
    student start) from each cache, per seed, and evaluate test accuracy; returns {cache name: [result per seed]}.
    A finished run (``outdir/<name>-s<seed>/result.json``) is read back, not retrained."""
    from dataclasses import replace

    from vlsi.demo.pipeline import DemoConfig, Prepared, train_arm
    from vlsi.eval.run import run_eval

    with open(os.path.join(demo_run, "summary.json")) as f:
        conf = json.load(f)["config"]
    base = DemoConfig(**{k_: (tuple(v) if isinstance(v, list) else v) for k_, v in conf.items()
                         if k_ in DemoConfig.__dataclass_fields__ and k_ != "out"})
    d = demo_run
    res: dict[str, list] = {name: [] for name in caches}
    for seed in seeds:
        for name, cache in caches.items():
            out = os.path.join(outdir, f"{name}-s{seed}")
            done = os.path.join(out, "result.json")
            if not os.path.exists(done):
                cfg = replace(base, out=out, seed=seed, progress=False, timings={})
                prep = Prepared(f"{d}/data/train.json", f"{d}/data/val.json", f"{d}/data/test.json",
                                f"{d}/runs/teacher/final", cache, f"{d}/runs/student-start/final", {})
                t0 = time.time()
                model_dir, _ = train_arm(cfg, prep, "vlsi")
                ev = run_eval(model_dir, prep.test_data, max_new_tokens=cfg.max_new_tokens)
                with open(done, "w") as f:
                    json.dump({"cache": name, "seed": seed, "test_acc": ev["accuracy"], "model": model_dir,
                               "wall_s": time.time() - t0}, f)
            with open(done) as f:
                r = json.load(f)
            if heldout_cache and "heldout_kl" not in r:
                r["heldout_kl"] = heldout_final_kl(r["model"], f"{d}/data/test.json", heldout_cache)
                with open(done, "w") as f:
                    json.dump(r, f)
            log(json.dumps(r))
            res[name].append(r)
    return res


def heldout_final_kl(model_dir: str, data: str, cache: str) -> float:
    """Mean coarse KL(teacher final || student final) over the answer rows of ``data`` (held-out split), the teacher
    read from ``cache`` (an exact top-k cache of that split)."""
    import torch

    from vlsi.cache_format import open_cache
    from vlsi.models import load_model
    from vlsi.models.data import read_dataset
    from vlsi.models.encoding import collate, encode_sample
    from vlsi.ops import sparse_kl_from_hidden
    from vlsi.train.join import targets_of

    adapter = load_model(model_dir, device="cpu")
    reader = open_cache(cache)
    total, rows = 0.0, 0
    with torch.no_grad():
        for smp in read_dataset(data):
            t = targets_of(reader.get(smp.id))
            if not t.ids.shape[0]:
                continue
            hid = adapter.forward_hidden(collate([encode_sample(smp, adapter)], adapter.tokenizer.pad_token_id), [])
            kl = sparse_kl_from_hidden(hid.final_hidden, adapter.lm_head.weight, t.ids[:, -1], t.logprobs[:, -1],
                                       t.tail[:, -1], real_vocab=adapter.vocab_size)
            total, rows = total + float(kl.sum()), rows + kl.shape[0]
    return total / max(rows, 1)


def _ms(results: list[dict], key: str, scale: float, fmt: str) -> str:
    a = np.array([r[key] for r in results if r.get(key) is not None]) * scale
    if not len(a):
        return "-"
    sd = f" ± {a.std(ddof=1):{fmt}}" if len(a) > 1 else ""
    return f"{a.mean():{fmt}}{sd} ({', '.join(f'{x:{fmt}}' for x in a)})"


def table(rows: list[dict]) -> str:
    base = next(r["B_per_row"] for r in rows if r["encoding"] == "fp16-logprob" and r["targets"] == "topk")
    stu = any("students" in r for r in rows)
    head = f"| encoding | targets | k | B/row | ratio vs exact | KL mean (nats) | worst layer KL | kept/row | decode MB/s |"
    head += " student test acc. % (mean ± sd, per seed) | student held-out KL (nats) |" if stu else ""
    lines = [head, "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if stu else "")]
    for r in rows:
        kl = f"{r['kl_mean']:.2e}" if r.get("kl_mean") is not None else "-"
        wl = f"{r['kl_worst_layer']:.2e}" if r.get("kl_worst_layer") is not None else "-"
        lines.append(f"| {r['encoding']} | {r['targets']} | {r['k']} | {r['B_per_row']:.1f} | "
                     f"{base / r['B_per_row']:.1f}x | {kl} | {wl} | {r['kept_per_row']:.1f} | {r['decode_MB_s']:.0f} |"
                     + (f" {_ms(r.get('students', []), 'test_acc', 100, '.1f')} | "
                        f"{_ms(r.get('students', []), 'heldout_kl', 1, '.4f')} |" if stu else ""))
    return "\n".join(lines)


@click.command()
@click.option("--samples", default=200, show_default=True)
@click.option("--answers", default=40, show_default=True, help="answer positions per sample")
@click.option("--layers", default=21, show_default=True, help="rows per answer position (targets + final)")
@click.option("--k", default=64, show_default=True)
@click.option("--vocab", default=151936, show_default=True)
@click.option("--samples-per-row", "spr", default="12,24", show_default=True, help="sampled-target draws to bench")
@click.option("--encodings", default=",".join(ENCODINGS), show_default=True)
@click.option("--profile", default="flat", show_default=True, metavar="flat|CACHE|JSON",
              help="per-layer profile of the synthetic rows: flat (round-1 generator), or fitted to a teacher "
                   "cache's measured profile (a cache directory, or a JSON written by --save-profile)")
@click.option("--save-profile", default=None, metavar="JSON", help="write the measured profile of --demo-run's "
              "cache (or of --profile CACHE) to JSON")
@click.option("--demo-run", default=None, metavar="DIR", help="a vlsi-demo --out DIR run: bench DIR/cache instead")
@click.option("--sampled-cache", default=None, metavar="DIR", help="with --demo-run: a sampled-targets cache of the "
              "same teacher and data (vlsi-extract --targets sampled; derive cannot make one: it needs the teacher)")
@click.option("--students", default=None, metavar="SEEDS", help="with --demo-run: train the demo's VLsI student "
              "arm from each cache for these seeds (e.g. 0,1,2) and add its test accuracy")
@click.option("--student-encodings", default="topk1-prevd-dq8,topk1-prevd-dq8-kl1e-2", show_default=True,
              help="the derived caches the student study trains from (besides exact and --sampled-cache)")
@click.option("--heldout-cache", default=None, metavar="DIR", help="with --students: an exact cache of the demo "
              "teacher on DIR/data/test.json (vlsi-extract): adds the students' held-out final-head KL to it")
@click.option("--workdir", default=None, help="where to write the caches (default: a temp dir, removed; with "
              "--students the derived caches and student runs stay in WORKDIR so a rerun resumes)")
@click.option("--json", "as_json", is_flag=True)
def main(samples, answers, layers, k, vocab, spr, encodings, profile, save_profile, demo_run, sampled_cache, students,
         student_encodings, heldout_cache, workdir, as_json):
    from _device import cpu_name

    from vlsi.cache_format import open_cache
    from vlsi.cache_format.derive import derive

    if students and not demo_run:
        raise click.ClickException("--students needs --demo-run (the students train from the demo's pieces)")
    keep = bool(students)
    if keep and not workdir:
        raise click.ClickException("--students needs --workdir (its runs take minutes each; a rerun resumes)")
    tmp = os.path.join(workdir, "economy") if keep else tempfile.mkdtemp(prefix="vlsi-economy-", dir=workdir)
    os.makedirs(tmp, exist_ok=True)
    encs = [e for e in encodings.split(",") if e]
    stu_encs = [e for e in student_encodings.split(",") if e] if students else []
    encs += [e for e in stu_encs if e not in encs]
    rows: list[dict] = []
    kept_caches: dict[str, str] = {}
    try:
        if demo_run is not None:
            exact = os.path.join(demo_run, "cache")
            if not os.path.exists(os.path.join(exact, "zarr.json")):
                raise click.ClickException(f"{demo_run}: no cache at {exact} (give a vlsi-demo --out DIR)")
            src = open_cache(exact)
            measured = measure_profile(src)
            info = {"source": exact, "n_answer_tokens": src.n_answer_tokens, "layers": src.fingerprint.n_layers,
                    "k": src.fingerprint.top_k, "vocab": src.fingerprint.vocab_size,
                    "overlap_prev_layer": _overlap(list(src.iter())), "profile": measured}
            if save_profile:
                with open(save_profile, "w") as f:
                    json.dump(measured, f, indent=1)
            if sampled_cache:
                rows.append(measure(sampled_cache, None, src.fingerprint.n_layers))
                kept_caches["sampled"] = sampled_cache
        else:
            t0 = time.perf_counter()
            prof = _load_profile(profile)
            if save_profile and prof is not None:
                with open(save_profile, "w") as f:
                    json.dump(prof["measured"], f, indent=1)
            recs, sampled = make_synthetic(samples, answers, layers, k, vocab, 0,
                                           tuple(int(x) for x in spr.split(",") if x), prof)
            exact = os.path.join(tmp, "exact")
            shutil.rmtree(exact, ignore_errors=True)
            _write(exact, _fingerprint(layers, k, vocab), recs)
            info = {"source": "synthetic", "profile_regime": profile, "samples": samples, "answers": answers,
                    "layers": layers, "k": k, "vocab": vocab, "overlap_prev_layer": _overlap(recs),
                    "top_k_mass_mean": float(np.mean([1 - np.exp(r.tail_logmass).mean() for r in recs])),
                    "gen_s": time.perf_counter() - t0, "profile": measure_profile(open_cache(exact))}
            if prof is not None:
                info["fit"] = {k_: v for k_, v in prof.items() if k_ != "measured"}
            for N, srecs in sampled.items():
                for se in ("topk1-plain-q8", "topk1-prevd-dq8"):
                    url = os.path.join(tmp, f"sampled{N}-{se}")
                    _write(url, _fingerprint(layers, N, vocab, targets="sampled", samples_per_row=N,
                                             value_encoding=se), srecs)
                    rows.append(measure(url, None, layers))
                    shutil.rmtree(url, ignore_errors=True)
            del recs, sampled
        rows.insert(0, measure(exact, exact, layers))
        kept_caches["exact"] = exact
        for e in encs:
            url = os.path.join(tmp, e)
            if not (keep and os.path.exists(os.path.join(url, "zarr.json"))):
                shutil.rmtree(url, ignore_errors=True)
                derive(exact, url, encoding=e)
            rows.append(measure(url, exact, layers))
            if e in stu_encs:
                kept_caches[e] = url
            elif not keep:
                shutil.rmtree(url, ignore_errors=True)
        if students:
            res = student_study(demo_run, kept_caches, [int(x) for x in students.split(",") if x],
                                os.path.join(workdir, "students"), log=lambda m: click.echo(m, err=True),
                                heldout_cache=heldout_cache)
            for r in rows:
                name = ("exact" if r["encoding"] == "fp16-logprob" and r["targets"] == "topk" else
                        "sampled" if r["targets"] == "sampled" and "sampled" in res else r["encoding"])
                if name in res and (r["targets"] == "topk" or name == "sampled"):
                    r["students"] = res[name]
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {"device": cpu_name(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "data": info,
           "rows": rows}
    if as_json:
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(json.dumps({k_: v for k_, v in out["data"].items() if k_ not in ("profile", "fit")}))
        click.echo(json.dumps({"device": out["device"], "cpu_count": out["cpu_count"], "load_avg": out["load_avg"]}))
        if "fit" in info:
            click.echo("fit check: " + json.dumps(info["fit"]["check"]))
        click.echo("\nper-layer profile of the " + ("teacher cache" if demo_run else "synthetic exact cache") + ":\n")
        click.echo(profile_table(info["profile"]))
        click.echo("")
        click.echo(table(rows))


if __name__ == "__main__":
    main()
