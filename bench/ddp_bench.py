"""Data-parallel scaling of ``vlsi-train``: the same global batch in 1 process (micro-batch B, accumulation N) and in
N processes under torchrun (micro-batch B, accumulation 1), measured in the same run on this machine, for both
parallel modes:

- ``ddp``: LoRA (the default trainable set), weights replicated, one gradient all-reduce per step;
- ``fsdp``: ``--full --parallel fsdp`` (FSDP2: decoder layers and trunk sharded, gathered per layer in forward and
  backward, gradients reduce-scattered), against one process training the same ``--full`` set.

Builds a tiny Qwen2-VL teacher/student pair, the procedural VQA data and a teacher cache (vlsi-extract), then times
the interaction stage. Reports tokens/s of each from metrics.jsonl (sum of tokens / sum of step times, first step
left out) and the ratio N-process / 1-process per mode, with the device. On CPU each process gets ``cores / N``
threads, so the ratio measures the overheads of the split (collectives, duplicated start-up), not a speed-up a GPU
per rank would give.

    python bench/ddp_bench.py [--nproc 2] [--steps 20] [--size test|student] [--modes ddp,fsdp] [--out ddp.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from _device import cpu_name  # bench/_device.py: the machine a figure was measured on


def _rate(out: Path) -> tuple[float, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # first step: warm-up
    return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows), rows[-1]["loss"]


@click.command()
@click.option("--nproc", default=2, show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--size", default="student", show_default=True, type=click.Choice(["test", "student"]))
@click.option("--threads-one", default=None, type=int,
              help="Threads of the 1-process run (default: all cores; 1 = the same per process as each rank).")
@click.option("--modes", default="ddp,fsdp", show_default=True, help="Parallel modes to measure.")
@click.option("--out", default=None, help="Write the figures as JSON here.")
def main(nproc: int, steps: int, batch_size: int, size: str, threads_one: int | None, modes: str, out: str | None):
    """Tokens/s of N ranks vs 1 process at the same global batch (see the module doc)."""
    if not set(modes.split(",")) <= {"ddp", "fsdp"}:
        raise click.BadParameter(f"{modes} (choose from ddp,fsdp)", param_hint="--modes")
    from vlsi.demo.tiny import build_tokenizer, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract
    from vlsi.models import VerbalizerSet, load_model

    root = Path(tempfile.mkdtemp(prefix="ddp_bench_"))
    tok = build_tokenizer(family="qwen2_vl")
    teacher = write_tiny_model(root / "teacher", "qwen2_vl", tokenizer=tok, size=size, seed=1)
    student = write_tiny_model(root / "student", "qwen2_vl", tokenizer=tok, size=size, seed=2)
    data = generate_vqa(root / "data", n_train=batch_size * nproc * (steps + 1), n_val=2, n_test=2, seed=0)["train"]
    for name, model, layers in (("tv", teacher, [0, 1, 2]), ("sv", student, [0, 1])):
        ad = load_model(model, device="cpu")
        VerbalizerSet.for_model(ad, layers).save(root / name, ad.fingerprint())
    run_extract(ExtractConfig(teacher=str(teacher), verbalizers=str(root / "tv"), data=str(data),
                              out=str(root / "cache"), top_k=16, device="cpu", progress=False))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLSI_INDEX_DIR": str(root / "index")}
    common = ["--cache", str(root / "cache"), "--student", str(student), "--data", str(data),
              "--student-verbalizers", str(root / "sv"), "--stages", "interact", "--steps", str(steps),
              "--batch-size", str(batch_size), "--lora-rank", "8", "--device", "cpu", "--no-progress"]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    res = {"device": cpu_name(), "size": size, "steps": steps, "global_batch": batch_size * nproc,
           "threads_one": threads_one or os.cpu_count(), "threads_per_rank": threads, "modes": {}}
    print(f"device: {res['device']} | global batch {batch_size * nproc} | threads: 1 process "
          f"{res['threads_one']}, each of {nproc} ranks {threads}")
    for mode in modes.split(","):
        extra = {"ddp": [], "fsdp": ["--full", "--parallel", "fsdp"]}[mode]
        one, many = root / f"one_{mode}", root / f"many_{mode}"
        subprocess.run([sys.executable, "-m", "vlsi.train", *common, *extra[:1], "--out", str(one), "--grad-accum",
                        str(nproc)], check=True, env={**env, "OMP_NUM_THREADS": str(res["threads_one"])})
        subprocess.run([*torchrun, "-m", "vlsi.train", *common, *extra, "--out", str(many), "--grad-accum", "1"],
                       check=True, env={**env, "OMP_NUM_THREADS": str(threads)})
        (r1, l1), (rn, ln) = _rate(one), _rate(many)
        res["modes"][mode] = {"one_process_tokens_per_s": r1, f"{nproc}_process_tokens_per_s": rn, "ratio": rn / r1,
                              "last_loss_one": l1, f"last_loss_{nproc}": ln,
                              "trains": "LoRA" if mode == "ddp" else "--full"}
        print(f"{mode:4s} ({res['modes'][mode]['trains']}): 1 process (accum {nproc}) {r1:.0f} tokens/s | {nproc} "
              f"processes (accum 1) {rn:.0f} tokens/s | ratio {rn / r1:.2f} | last loss {l1:.6f} vs {ln:.6f}")
    if out:
        Path(out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
