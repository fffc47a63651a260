"""The miniature reproduction: SFT-only vs VLsI and the paper's key ablations, over several seeds.

Usage (long on a CPU; every number it writes is measured in the run):

    python bench/reproduce.py --out runs/repro --seeds 0,1,2 [--arms sft,vlsi,kld-none,ce-none,random-index]
                              [--student-steps 600] [--write-results docs/results.md]

Per seed it prepares the shared pieces once (data, teacher SFT, teacher verbalizers, cache, student start: see
``vlsi.demo.pipeline.prepare``), trains every arm with the same step budget, and evaluates on the val and test splits
and on a second test split drawn with another data seed (``DemoConfig.fresh_test_seed``). The table reports means and
spreads (sample std over seeds); val is reported beside test because it is the split to tune on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

LABELS = {
    "sft": "SFT only",
    "vlsi": "VLsI: kld/kld, multinomial + range + order + adaptive T",
    "kld-none": "VLsI: kld/none (no last-layer KL)",
    "ce-none": "VLsI: ce/none",
    "random-index": "VLsI: random index matching",
    "no-sft": "VLsI without the sft step (verbalize + interact)",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(LABELS))
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny budget, to check the script runs")
    ap.add_argument("--write-results", default=None, help="write the markdown table here (e.g. docs/results.md)")
    args = ap.parse_args(argv)

    from vlsi.demo.pipeline import DemoConfig, prepare, train_arm
    from vlsi.eval.run import run_eval

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in LABELS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(LABELS)}")
    commit = _commit()  # the code that produced the numbers: read before the (long) run starts
    results: dict[str, dict[str, list[float]]] = {a: {"val": [], "test": [], "fresh": []} for a in arms}
    teacher_acc: dict[str, list[float]] = {"val": [], "test": [], "fresh": []}
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        kw = {k: v for k, v in dict(student_steps=args.student_steps, teacher_steps=args.teacher_steps).items()
              if v is not None}
        base = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
        cfg = replace(base, out=str(Path(args.out) / f"seed{seed}"), seed=seed, progress=False, timings={})
        prep = prepare(cfg)
        splits = [("val", prep.val_data), ("test", prep.test_data), ("fresh", prep.fresh_test_data)]
        splits = [(k, p) for k, p in splits if p]
        for split, path in splits:
            teacher_acc[split].append(run_eval(prep.teacher, path, max_new_tokens=cfg.max_new_tokens)["accuracy"])
        for arm in arms:
            model_dir, _ = train_arm(cfg, prep, arm)
            for split, path in splits:
                acc = run_eval(model_dir, path, max_new_tokens=cfg.max_new_tokens)["accuracy"]
                results[arm][split].append(acc)
            print(json.dumps({"seed": seed, "arm": arm, **{k: results[arm][k][-1] for k, _ in splits}}), flush=True)

    table = format_table(results, teacher_acc, arms, cfg, time.perf_counter() - t0, commit)
    print(table)
    if args.write_results:
        Path(args.write_results).write_text(table + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"arms": results, "teacher": teacher_acc}, indent=2))
    return 0


def _ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    mean = 100 * statistics.fmean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def format_table(results, teacher_acc, arms, cfg, wall_s, commit) -> str:
    lines = [
        "# Miniature reproduction",
        "",
        f"Command: `python bench/reproduce.py {' '.join(sys.argv[1:])}` at commit `{commit}`; "
        f"{len(teacher_acc['test'])} seed(s); wall time {wall_s / 60:.1f} min on this machine.",
        f"Budget per student arm: {cfg.student_steps} optimizer steps after a shared {cfg.student_pretrain_steps}-step "
        f"start; teacher {cfg.teacher_steps} SFT steps; k = {cfg.top_k}; batch {cfg.batch_size}.",
        "",
        "| model | val acc % (mean ± sd) | test acc % (mean ± sd) | fresh test acc % (mean ± sd) |",
        "|---|---|---|---|",
        f"| teacher | {_ms(teacher_acc['val'])} | {_ms(teacher_acc['test'])} | {_ms(teacher_acc['fresh'])} |",
    ]
    for arm in arms:
        r = results[arm]
        lines.append(f"| {LABELS[arm]} | {_ms(r['val'])} | {_ms(r['test'])} | {_ms(r['fresh'])} |")
    seeds = len(teacher_acc["test"])
    if seeds > 1:
        lines += ["", "Per seed (test accuracy %):", "",
                  "| model | " + " | ".join(f"seed #{k + 1}" for k in range(seeds)) + " |",
                  "|---|" + "---|" * seeds,
                  "| teacher | " + " | ".join(f"{100 * x:.1f}" for x in teacher_acc["test"]) + " |"]
        lines += [f"| {LABELS[arm]} | " + " | ".join(f"{100 * x:.1f}" for x in results[arm]["test"]) + " |"
                  for arm in arms]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
