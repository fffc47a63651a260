"""Extraction throughput: (a) bare teacher forward, (b) + verbalizers + head + top-k, (c) full run with writing.

One run, same teacher, same samples, same batches. Prints tokens/s (non-padding input tokens) and answer tokens/s
of each, and the ratios b/a (cost of the verbalized top-k) and c/b (target >= 0.95: reading, encoding, the
device->host copy, compression and storage all overlapped with the teacher).

    python bench/extract_bench.py                       # CPU: the demo-sized Qwen2-VL teacher, procedural VQA data
    python bench/extract_bench.py --shape 7b-random     # GPU: Qwen2-VL-7B shapes (28 x 3584, vocab 152064), random
    python bench/extract_bench.py --backend vllm        # vlsi-extract --backend transformers vs vllm, same data
    python bench/extract_bench.py --backend vllm --family qwen2   # the same with a text-only teacher

``--backend vllm`` runs ``vlsi-extract`` twice on the same teacher, verbalizers and data: once per backend, each in
its own interpreter (the transformers one here, the vLLM one in ``$VLSI_VLLM_PYTHON``, default
``/work/vllm-venv/bin/python``), and reports both backends' tokens/s side by side plus the largest log-prob
difference between the two caches. ``--family qwen2_vl`` (default): the demo "teacher" Qwen2-VL (8 x 128, head_dim
32 as vLLM's CPU attention needs, a 2-block vision tower) on the procedural VQA questions WITH their images;
``--family qwen2``: the same text shape as a Qwen2, on the questions without their images.

The 7b-random teacher is built in memory on the GPU (no checkpoint): the tokenizer and image processor come from
the tiny demo model directory; the real vocabulary is set to Qwen2-VL's (151646 of 152064 head rows) so the
head + top-k cost is real-shaped (the tiny tokenizer's ids are a subset of it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _device import cpu_name  # bench/_device.py: the machine a figure was measured on


class _RealVocab:
    """A ModelAdapter view with a different real vocab size (7b-random: Qwen2-VL's 151646 of 152064 rows)."""

    def __init__(self, adapter, vocab_size: int):
        self._a, self._v = adapter, vocab_size

    def __getattr__(self, name):
        return getattr(self._a, name)

    @property
    def vocab_size(self) -> int:
        return self._v

    def fingerprint(self) -> dict:
        return dict(self._a.fingerprint(), vocab_size=self._v)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build_teacher(shape: str, work: Path, device: str):
    """(adapter-like teacher, tiny model dir holding the tokenizer/processor)."""
    import torch

    from vlsi.demo.tiny import build_tokenizer, make_config, model_class, write_tiny_model
    from vlsi.models import load_model
    from vlsi.models.adapter import ModelAdapter
    from vlsi.models.processors import load_processor_bundle

    tok = build_tokenizer(family="qwen2_vl")
    if shape == "small":
        d = write_tiny_model(work / "teacher", "qwen2_vl", tokenizer=tok, size="teacher")
        return load_model(d, device=device), d
    d = write_tiny_model(work / "tok", "qwen2_vl", tokenizer=tok, size="test")
    cfg = make_config("qwen2_vl", "teacher", tok)
    tc = cfg.text_config
    for k, v in dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064).items():
        setattr(tc, k, v)
    head_dim = 3584 // 28
    tc.rope_parameters = dict(tc.rope_parameters, mrope_section=[16, 24, 24])  # Qwen2-VL-7B's split of 64
    assert sum(tc.rope_parameters["mrope_section"]) * 2 == head_dim
    vc = cfg.vision_config
    for k, v in dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584).items():
        setattr(vc, k, v)
    cfg.vocab_size = 152064
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = model_class("qwen2_vl")._from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    print(f"built 7b-random teacher: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params "
          f"in {time.perf_counter() - t0:.0f}s")
    adapter = ModelAdapter(model, load_processor_bundle(d), name="qwen2-vl-7b-random", model_dir=d, preset=None)
    return _RealVocab(adapter, 151646), d


def _text_only_copy(src: Path, dst: Path) -> Path:
    """The VQA split without images (text-only teachers): drop the image fields and placeholders."""
    records = json.loads(src.read_text())
    for r in records:
        r.pop("image", None)
        r.pop("images", None)
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "").strip() or "?"
    dst.write_text(json.dumps(records))
    return dst


def _count_images(data: Path) -> int:
    n = 0
    for r in json.loads(Path(data).read_text()):
        img = r.get("image", r.get("images"))
        n += len(img) if isinstance(img, list) else int(img is not None)
    return n


def bench_backends(args) -> None:
    """vlsi-extract --backend transformers vs --backend vllm on the same teacher, verbalizers and data."""
    import os
    import subprocess
    import sys

    import numpy as np
    import torch

    from vlsi.cache_format import open_cache
    from vlsi.demo.tiny import build_tokenizer, make_config, model_class, write_tiny_model
    from vlsi.demo.vqa import generate_vqa
    from vlsi.models import VerbalizerSet, load_model

    vllm_python = os.environ.get("VLSI_VLLM_PYTHON", "/work/vllm-venv/bin/python")
    if not Path(vllm_python).exists():
        raise SystemExit(f"no vLLM interpreter at {vllm_python}: run scripts/vllm_env.sh or set VLSI_VLLM_PYTHON")
    n = args.samples or 96
    work = Path(tempfile.mkdtemp(prefix="vlsi-extract-bench-vllm-"))
    vlm = args.family != "qwen2"
    tok = build_tokenizer(family=args.family)
    if vlm:  # 10 layers x 128, 4 heads of 32; vision tower 2 x 64
        write_tiny_model(work / "teacher", args.family, tokenizer=tok, size="teacher")
    else:
        cfg = make_config("qwen2", "teacher", tok)  # 10 layers x 128, 4 heads of 32
        torch.manual_seed(0)
        model = model_class("qwen2")(cfg).eval()
        model.save_pretrained(work / "teacher")
        tok.save_pretrained(work / "teacher")
        del model
    adapter = load_model(work / "teacher", device=args.device)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(2, adapter.num_layers - 1, 4)))
    vs = VerbalizerSet.for_model(adapter, layers)
    with torch.no_grad():
        for p in vs.parameters():
            p.normal_(0, 0.02)
    vs.save(work / "verb", adapter.fingerprint())
    del adapter
    data = generate_vqa(work / "data", n_train=n, n_val=1, n_test=1, seed=0)["train"]
    if not vlm:
        data = _text_only_copy(data, work / "text.json")
    common = ["--teacher", str(work / "teacher"), "--verbalizers", str(work / "verb"), "--data", str(data),
              "--top-k", str(args.top_k), "--layers", ",".join(map(str, layers)), "--no-progress", "--json",
              "--bucket-window", str(max(n, 1))]
    runs = {
        "transformers": [sys.executable, "-m", "vlsi.extract.cli", *common, "--out", str(work / "c-tf"),
                         "--batch-size", str(args.batch_size or 8)],
        "vllm": [vllm_python, "-m", "vlsi.extract.cli", *common, "--out", str(work / "c-vllm"), "--backend", "vllm",
                 "--batch-size", str(args.batch_size or 64), "--backend-option", f"kv_cache_memory_bytes={1 << 30}"],
    }
    res: dict = {"device": cpu_name() if args.device == "cpu" else args.device, "samples": n,
                 "family": args.family, "threads": args.threads or "default",
                 "layers": layers, "top_k": args.top_k}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]  # vLLM also logs on stdout
        if not lines:
            raise SystemExit(f"{name} run printed no summary:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        s = json.loads(lines[-1])
        res[name] = {"input_tok_s": s["input_tokens"] / s["loop_s"], "answer_tok_s": s["answer_tokens_per_s"],
                     "samples_s": s["samples_per_s"], "loop_s": s["loop_s"], "forward_s": s["forward_s"],
                     "elapsed_s": s["elapsed_s"], "process_wall_s": wall, "input_tokens": s["input_tokens"],
                     "answer_tokens": s["answer_tokens"], "images": _count_images(data)}
    a, b = open_cache(str(work / "c-tf")), open_cache(str(work / "c-vllm"))
    res["max_abs_logprob_diff"] = max(
        float(np.abs(a.get(sid).topk_logprobs - b.get(sid).topk_logprobs).max()) for sid in a.sample_ids)
    if args.json:
        print(json.dumps(res))
        return
    teacher = f"{args.family} 10x128" + (" + 2x64 vision tower" if vlm else " (text)")
    print(f"device: {res['device']} ({res['threads']} threads)  teacher: {teacher}  samples: {n} "
          f"({res['vllm']['images']} images)  layers: {layers}+final  k: {args.top_k}  tokens: "
          f"{res['vllm']['input_tokens']} input / {res['vllm']['answer_tokens']} answer")
    for name in runs:
        r = res[name]
        print(f"{name:13s} {r['input_tok_s']:9.0f} input tok/s  {r['answer_tok_s']:8.0f} answer tok/s  "
              f"{r['samples_s']:7.1f} samples/s  (loop {r['loop_s']:.2f}s, forward {r['forward_s']:.2f}s; "
              f"whole process {r['process_wall_s']:.1f}s incl. start-up)")
    print(f"caches agree: max |log-prob difference| = {res['max_abs_logprob_diff']:.2e}")


def main() -> None:
    import torch

    from vlsi.demo.vqa import generate_vqa
    from vlsi.extract.backends.transformers_backend import TransformersBackend
    from vlsi.extract.batching import length_batches
    from vlsi.extract.compute import head_spec_of, layer_topk
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import _requests_of, load_teacher_verbalizers, run_extract
    from vlsi.models import VerbalizerSet, encode_sample
    from vlsi.models.data import read_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["small", "7b-random"], default="small")
    ap.add_argument("--samples", type=int, default=None, help="default: 96 (small) / 512 (7b-random)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 (small) / 32 (7b-random)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--layers", default=None, help="verbalizer layers (default: every 4th from 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="cache URL for (c) (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                    help="vllm: both backends' vlsi-extract on the same teacher and data (CPU; see --family)")
    ap.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "qwen2"], default="qwen2_vl",
                    help="--backend vllm: the teacher (a VLM on the VQA questions with their images, or a text "
                         "Qwen2 on the questions without them)")
    ap.add_argument("--threads", type=int, default=None,
                    help="--backend vllm: OMP_NUM_THREADS for both runs (1 on a shared machine: busy cores make "
                         "multi-threaded CPU kernels spin)")
    args = ap.parse_args()
    if args.backend == "vllm":
        return bench_backends(args)
    n = args.samples or (96 if args.shape == "small" else 512)
    bs = args.batch_size or (8 if args.shape == "small" else 32)

    work = Path(tempfile.mkdtemp(prefix="vlsi-extract-bench-"))
    teacher, _ = build_teacher(args.shape, work, args.device)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(2, teacher.num_layers - 1, 4)))
    vs = VerbalizerSet.for_model(teacher, layers)
    with torch.no_grad():
        for name, p in vs.named_parameters():  # a trained verbalizer's cost: non-zero weights
            p.normal_(0, 0.02)
    vs.save(work / "verb", teacher.fingerprint())
    paths = generate_vqa(work / "data", n_train=n, n_val=1, n_test=1, seed=0)
    data = str(paths["train"])

    encs = [encode_sample(s, teacher) for s in read_dataset(data)]
    batches = [[encs[i] for i in b] for b in length_batches([e.length for e in encs], batch_size=bs)]
    n_tok = sum(e.length for e in encs)
    n_ans = sum(int(e.answer_positions.numel()) for e in encs)
    backend = TransformersBackend(teacher)
    vset = load_teacher_verbalizers(str(work / "verb"), teacher)
    head = head_spec_of(teacher)
    from vlsi.models.encoding import collate

    collated = [collate(b, backend.pad_id) for b in batches]

    def bare():
        with torch.inference_mode():
            for b in collated:
                teacher.base_model(**b.model_kwargs(teacher.device), use_cache=False)
        _sync(args.device)

    def verbalized():
        with torch.inference_mode():
            for b in batches:
                outs = backend.run(_requests_of([(e, ()) for e in b]), layers)
                lh = {i: torch.cat([o.layer_hidden[i] for o in outs]) for i in layers}
                fh = torch.cat([o.final_hidden for o in outs])
                r = layer_topk(lh, fh, layers=layers, verbalizer=vset.forward, head=head, k=args.top_k)
                r.ids.cpu()  # what the writer thread would copy
        _sync(args.device)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # warm-up (kernels, allocator) on the first batch only
    with torch.inference_mode():
        teacher.base_model(**collated[0].model_kwargs(teacher.device), use_cache=False)
    _sync(args.device)
    ta = timed(bare)
    tb = timed(verbalized)
    out = args.out or str(work / "cache")
    cfg = ExtractConfig(teacher="(in memory)", verbalizers=str(work / "verb"), data=data, out=out, top_k=args.top_k,
                        layers=tuple(layers), batch_size=bs, bucket_window=max(n, 1), progress=False)
    s = run_extract(cfg, teacher=teacher, backend=backend)
    tc = s["loop_s"]
    res = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()}-thread CPU",
        "shape": args.shape, "samples": n, "batch_size": bs, "layers": layers, "top_k": args.top_k,
        "vocab": [teacher.vocab_size, teacher.padded_vocab_size], "input_tokens": n_tok, "answer_tokens": n_ans,
        "a_bare_tok_s": n_tok / ta, "b_verbalized_tok_s": n_tok / tb, "c_full_tok_s": s["input_tokens"] / tc,
        "c_answer_tok_s": s["answer_tokens_per_s"], "c_samples_s": s["samples_per_s"],
        "b_over_a": ta / tb, "c_over_b": (n_tok / tc) / (n_tok / tb) if s["input_tokens"] == n_tok else None,
        "encode_s": s["encode_s"], "input_wait_s": s["input_wait_s"], "loop_s": tc,
        "writer_busy_s": s["writer_busy_s"], "writer_blocked_s": s["writer_blocked_s"],
        "bytes_per_answer_token": s["bytes_per_answer_token"], "padding_fraction": s["padding_fraction"],
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"device: {res['device']}  shape: {args.shape}  samples: {n}  batch: {bs}  layers: {layers}+final  "
          f"k: {args.top_k}  vocab: {res['vocab'][0]}/{res['vocab'][1]}")
    print(f"(a) bare forward          {res['a_bare_tok_s']:10.0f} tok/s")
    print(f"(b) + verbalizers + top-k {res['b_verbalized_tok_s']:10.0f} tok/s   b/a = {res['b_over_a']:.3f}")
    print(f"(c) full, with writing    {res['c_full_tok_s']:10.0f} tok/s   c/b = {res['c_over_b']:.3f}   "
          f"({res['c_answer_tok_s']:.0f} answer tok/s, {res['c_samples_s']:.1f} samples/s)")
    print(f"(c) loop {tc:.2f}s: waited {s['input_wait_s']:.2f}s for input (encoding took {s['encode_s']:.2f}s), "
          f"writer busy {s['writer_busy_s']:.2f}s, loop blocked on writer {s['writer_blocked_s']:.3f}s, "
          f"{s['bytes_per_answer_token']:.0f} B/answer token, padding {100 * s['padding_fraction']:.1f}%")


if __name__ == "__main__":
    main()
