"""Data at scale: synthetic LLaVA-style JSONL datasets of 10k / 100k / 1M samples over a few hundred distinct ~30 KB
images, measured in ONE run (each measurement in a fresh process, so RSS figures are its own):

- the index build (once per file; linear, reported);
- ``vlsi-train --stages sft`` on a tiny Qwen2-VL student: peak RSS and wall time of a ``--steps 1`` process
  (start-up + the first optimizer step + export of the tiny model) with the index already built, and of the
  ``--steps 2`` run of the issue's target with the index build included (100k);
- steady samples/s over 20 steps;
- the extraction reader's throughput: random records read + images loaded + encoded, per second.

The ratio that matters is the 1M figure against the 10k one, measured in the same run (target: RSS and time to the
first step within 1.25x). ``open_cache`` at 1M samples is measured by ``bench/cache_scale_bench.py``.

    python bench/scale_bench.py [--sizes 10000,100000,1000000] [--out scale.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from _device import cpu_name  # bench/_device.py: the machine a figure was measured on

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, *, side: int = 110, seed: int = 0) -> list[str]:
    """``n`` distinct noisy PNGs of ~30 KB (noise keeps PNG from compressing them away)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-40, 40, size=(side, side, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        name = f"img{i:04d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


def make_jsonl(path: Path, n: int, images: list[str]) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i:07d}", "image": f"imgs/{images[i % len(images)]}", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]}) + "\n")


def _child(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line; add its wall time and peak RSS."""
    wrapped = ("import json, resource, time, sys; t0 = time.perf_counter()\n" + code +
               "\nres['wall_s'] = time.perf_counter() - t0"
               "\nres['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
               "\nprint('RESULT ' + json.dumps(res))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    res["process_s"] = time.perf_counter() - t0  # interpreter start-up and imports included
    return res


INDEX = """
from vlsi.models.dataset import open_dataset
ds = open_dataset(sys.argv[1] if len(sys.argv) > 1 else {data!r})
res = {{'samples': len(ds), 'index_bytes': sum(f.stat().st_size for f in ds.index_path.iterdir())}}
"""

TRAIN = """
from vlsi.train.config import TrainConfig
from vlsi.train.recipe import run
s = run(TrainConfig(student={student!r}, data={data!r}, out={out!r}, stages=('sft',), steps={steps}, batch_size=4,
                    full=True, lr=1e-3, device='cpu', progress=False))
m = [json.loads(x) for x in open({out!r} + '/metrics.jsonl')]
res = {{'steps': len(m), 'samples_per_s': m[-1]['samples_per_s'],
       'steady_samples_per_s': (sum(r['samples'] for r in m[1:]) / sum(r['step_s'] for r in m[1:])) if len(m) > 1 else None}}
"""

READER = """
import numpy as np
from vlsi.models.dataset import open_dataset
from vlsi.models.processors import load_processor_bundle
from vlsi.models.encoding import encode_sample
ds = open_dataset({data!r})
bundle = load_processor_bundle({student!r})
idx = np.random.default_rng(0).integers(0, len(ds), size=400)
t = time.perf_counter()
for i in idx:
    encode_sample(ds[int(i)], bundle)
res = {{'reader_samples_per_s': len(idx) / (time.perf_counter() - t)}}
"""


@click.command()
@click.option("--sizes", default="10000,100000,1000000", show_default=True, help="Dataset sizes, comma-separated.")
@click.option("--images", default=300, show_default=True, help="Distinct images the samples share.")
@click.option("--workdir", default=None, help="Where the datasets go (default: a temp dir, removed after).")
@click.option("--out", default=None, help="Write the results as JSON here.")
def main(sizes: str, images: int, workdir: str | None, out: str | None):
    """Measure the data path at 10k / 100k / 1M samples (see the module doc)."""
    from vlsi.demo.tiny import build_tokenizer, write_tiny_model

    ns = [int(x) for x in sizes.split(",")]
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(workdir or tmp.name)
    env = {**os.environ, "VLSI_INDEX_DIR": str(root / "index"), "TOKENIZERS_PARALLELISM": "false"}
    names = make_images(root / "imgs", images)
    img_kb = sum((root / "imgs" / n).stat().st_size for n in names) / len(names) / 1024
    student = str(write_tiny_model(root / "student", "qwen2_vl", tokenizer=build_tokenizer(), size="test"))
    rows = []
    for n in ns:
        data = root / f"d{n}.jsonl"
        t = time.perf_counter()
        make_jsonl(data, n, names)
        gen_s = time.perf_counter() - t
        fmt = dict(data=str(data), student=student)
        build = _child(INDEX.format(**fmt), {**env, "VLSI_INDEX_DIR": str(root / f"index-build-{n}")})
        first = _child(TRAIN.format(**fmt, out=str(root / f"t2-{n}"), steps=2), env)  # index built inside
        idx = _child(INDEX.format(**fmt), env)  # reuses it: the open cost
        one = _child(TRAIN.format(**fmt, out=str(root / f"t1-{n}"), steps=1), env)
        steady = _child(TRAIN.format(**fmt, out=str(root / f"t20-{n}"), steps=20), env)
        reader = _child(READER.format(**fmt), env)
        rows.append({"samples": n, "file_mb": data.stat().st_size / 2**20, "generate_s": gen_s,
                     "index_build_s": build["wall_s"], "index_build_peak_rss_mb": build["peak_rss_mb"],
                     "index_bytes_per_sample": idx["index_bytes"] / n,
                     "steps2_with_index_build_s": first["process_s"], "steps2_peak_rss_mb": first["peak_rss_mb"],
                     "open_index_s": idx["wall_s"], "first_step_process_s": one["process_s"],
                     "first_step_peak_rss_mb": one["peak_rss_mb"], "steady_samples_per_s": steady["steady_samples_per_s"],
                     "reader_samples_per_s": reader["reader_samples_per_s"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]
    for r in rows:
        r["rss_ratio_vs_first"] = r["first_step_peak_rss_mb"] / base["first_step_peak_rss_mb"]
        r["first_step_time_ratio_vs_first"] = r["first_step_process_s"] / base["first_step_process_s"]
    result = {"device": cpu_name(), "image_kb": img_kb, "distinct_images": images, "rows": rows}
    print(f"device: {result['device']}; images: {images} distinct, {img_kb:.1f} KB each")
    cols = [("samples", "{:>9}"), ("file_mb", "{:>8.1f}"), ("index_build_s", "{:>7.1f}"),
            ("index_build_peak_rss_mb", "{:>7.0f}"), ("steps2_with_index_build_s", "{:>10.1f}"),
            ("steps2_peak_rss_mb", "{:>9.0f}"), ("index_bytes_per_sample", "{:>8.1f}"), ("open_index_s", "{:>7.3f}"),
            ("first_step_process_s", "{:>8.1f}"), ("first_step_peak_rss_mb", "{:>8.0f}"),
            ("rss_ratio_vs_first", "{:>6.2f}"), ("first_step_time_ratio_vs_first", "{:>6.2f}"),
            ("steady_samples_per_s", "{:>8.1f}"), ("reader_samples_per_s", "{:>8.1f}")]
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(f.format(r[c]) for c, f in cols))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
