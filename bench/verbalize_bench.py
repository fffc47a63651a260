"""Verbalizer figures: parameter counts at the real Qwen2-VL shapes, and the verbalization step's throughput.

    python bench/verbalize_bench.py [--size test|student|teacher] [--steps 20] [--batch-size 8] [--json out.json]

Part 1 is arithmetic from the published configs (no download). Part 2 builds a tiny Qwen2-VL (demo/tiny.py) and the
embedded VQA data in a temp dir and times ``vlsi.train.recipe.run_verbalize`` (tokens/s = all non-padding tokens of the
batches through the frozen backbone + verbalizers + chunked CE, measured from the first step, model load excluded).
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import click

# Published configs (config.json of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct): hidden, intermediate, layers, heads, kv heads.
QWEN2_VL_SHAPES = {
    "qwen2-vl-2b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv=2),
    "qwen2-vl-7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv=4),
    "qwen2-vl-72b": dict(hidden=8192, intermediate=29568, layers=80, heads=64, kv=8),
}


def parameter_table() -> list[dict]:
    from vlsi.models import PRESETS, parameter_count
    from vlsi.models.names import VERBALIZER_KINDS as KINDS

    rows = []
    for name, s in QWEN2_VL_SHAPES.items():
        n = len(PRESETS[name].target_layers)
        row = {"model": name, "hidden": s["hidden"], "verbalizers": n}
        for kind in KINDS:
            row[kind] = parameter_count(kind, s["hidden"], n, s["intermediate"], num_heads=s["heads"],
                                        num_kv_heads=s["kv"])
        rows.append(row)
    return rows


@click.command()
@click.option("--size", default="student", type=click.Choice(["test", "student", "teacher"]))
@click.option("--steps", default=20)
@click.option("--batch-size", default=8)
@click.option("--json", "json_out", default=None, help="Write the figures to this JSON file.")
def main(size, steps, batch_size, json_out):
    table = parameter_table()
    print("verbalizer parameters (Qwen2-VL shapes, preset target layers):")
    print(f"{'model':14} {'d':>5} {'n':>3} {'verb-ffn':>14} {'mlp':>14} {'ffn':>15} {'decoder':>15}")
    for r in table:
        print(f"{r['model']:14} {r['hidden']:5} {r['verbalizers']:3} {r['verb-ffn']:14,} {r['mlp']:14,} "
              f"{r['ffn']:15,} {r['decoder']:15,}")

    import torch

    from vlsi.demo.tiny import build_tokenizer, parameter_count, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.train.config import VerbalizeConfig
    from vlsi.train.recipe import run_verbalize as run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate_vqa(tmp / "vqa", n_train=max(64, steps * batch_size), n_val=4, n_test=4, seed=0,
                            image_size=56)
        model = write_tiny_model(tmp / "m", "qwen2_vl", tokenizer=build_tokenizer(), size=size)
        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(model).get_text_config().num_hidden_layers
        layers = list(range(0, n_layers - 1, 2))
        s = run(VerbalizeConfig(model=str(model), data=str(data["train"]), out=str(tmp / "v"), layers=layers,
                                steps=steps, batch_size=batch_size, lr=1e-3, progress=False, device="cpu"))
    device = f"{torch.get_num_threads()}-thread CPU ({platform.processor() or platform.machine()})"
    step_fig = {"size": size, "layers": layers,
                "steps": steps, "batch_size": batch_size, "tokens_per_s": s["tokens_per_s"],
                "samples_per_s": s["samples_per_s"], "device": device}
    print(f"\nverbalization step, tiny qwen2_vl '{size}', {len(layers)} verbalizers, batch {batch_size}, "
          f"{steps} steps on {device}: {s['tokens_per_s']:.0f} tokens/s, {s['samples_per_s']:.1f} samples/s")
    if json_out:
        Path(json_out).write_text(json.dumps({"parameters": table, "step": step_fig}, indent=2) + "\n")


if __name__ == "__main__":
    main()
