"""Benchmark: vlsi-eval greedy generation throughput (samples/s, generated tokens/s) by batch size, and the cost
of the per-layer view, on the embedded demo's student-size Qwen2-VL (random weights, so answers run to
--max-new-tokens: the worst case).

    python bench/eval_generate.py [--n 48] [--max-new-tokens 8] [--size student] [--batch-sizes 1,8,16]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option("--n", default=48, show_default=True, help="Test samples to generate for.")
@click.option("--max-new-tokens", default=8, show_default=True)
@click.option("--size", default="student", show_default=True, type=click.Choice(["test", "student", "teacher"]))
@click.option("--batch-sizes", default="1,8,16", show_default=True)
def main(n, max_new_tokens, size, batch_sizes):
    import torch

    from vlsi.demo.tiny import build_tokenizer, parameter_count, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.eval.layers import layer_answers
    from vlsi.eval.run import run_eval
    from vlsi.models import VerbalizerSet, load_model
    from vlsi.models.data import read_dataset

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_tiny_model(tmp / "m", "qwen2_vl", tokenizer=build_tokenizer(), size=size)
        data = generate_vqa(tmp / "data", n_train=0, n_val=0, n_test=n, seed=0)["test"]
        adapter = load_model(model_dir, device="cpu")
        print(f"qwen2_vl size={size} params={parameter_count(model_dir):,} threads={torch.get_num_threads()} "
              f"n={n} max_new_tokens={max_new_tokens}")
        run_eval(adapter, data, batch_size=8, max_new_tokens=2, limit=8)  # warm-up
        for bs in [int(b) for b in batch_sizes.split(",")]:
            res = run_eval(adapter, data, batch_size=bs, max_new_tokens=max_new_tokens)
            print(f"batch {bs:>3}: {res['samples_per_s']:7.2f} samples/s  {res['tokens_per_s']:8.1f} gen tokens/s  "
                  f"({res['wall_s']:.2f} s)")
        vs = VerbalizerSet.for_model(adapter, list(range(0, adapter.num_layers - 1, 2)))
        sample = next(iter(read_dataset(data)))
        t = time.perf_counter()
        reps = 5
        for _ in range(reps):
            layer_answers(adapter, vs, sample, max_new_tokens=max_new_tokens)
        dt = (time.perf_counter() - t) / reps
        print(f"layers view: {len(vs.layers)} verbalizers + final, {dt * 1000:.0f} ms per sample")


if __name__ == "__main__":
    main()
