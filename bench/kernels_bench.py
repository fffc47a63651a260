"""Benchmark the vlsi.ops head kernels (torch and Triton paths): extraction top-k and the training sparse KL.

For each shape (tokens x hidden x vocab), in one run:
  extraction: bare head GEMM (x @ W.T, bf16 in, fp32 out), head_topk torch path, head_topk fused Triton path;
              ratios = GEMM time / path time (1.0 = runs at the bare GEMM's rate).
  training:   forward + backward wrt x of the per-row loss, summed over --layers heads (7 verbalized + final):
              fused sparse KL (Triton), chunked sparse KL (torch), unfused (materialised logits + coarse_kl +
              autograd), plain CE on materialised logits (what SFT's head costs); ms, tokens/s and peak memory
              (torch.cuda.max_memory_allocated) relative to plain CE. Head-only: the student's decoder is not in
              this measurement, so the whole-step ratio (bench/train_bench.py) would be closer to 1 than these.

    python bench/kernels_bench.py                  # GPU, real head shapes (72B / 7B / 2B)
    python bench/kernels_bench.py --small          # CPU-sized shapes (no Triton timing without a GPU)
    python bench/kernels_bench.py --shapes 4096x1536x151936 --k 64 --out bench.json
    python bench/kernels_bench.py --shapes 4096x8192x152064 --topk-only     # extraction only (bench/gpu_check.sh)
"""

from __future__ import annotations

import json
import statistics
import time

import click

DEFAULT_SHAPES = "4096x8192x152064,4096x3584x152064,4096x1536x151936"
SMALL_SHAPES = "256x256x8192,256x512x16384"


def _timer(device):
    import torch

    def run(fn, repeats):
        fn()  # warm-up (Triton compile, cuBLAS heuristics)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _peak_mb(device, fn):
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(n, d, v, *, k, layers, dtype, device, repeats, can_triton, topk_only=False):
    import torch
    import torch.nn.functional as F

    from vlsi.ops import coarse_kl, head_topk, sparse_kl_from_hidden

    g = torch.Generator(device="cpu").manual_seed(0)
    padded = (v + 127) // 128 * 128
    x = (torch.randn(n, d, generator=g) / d**0.5 * 4).to(dtype).to(device)
    w = (torch.randn(padded, d, generator=g)).to(dtype).to(device)
    timer = _timer(device)
    row = {"tokens": n, "hidden": d, "vocab": v, "k": k, "dtype": str(dtype).replace("torch.", ""),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def gemm():
        if device.type == "cuda":
            return torch.mm(x, w[:v].t(), out_dtype=torch.float32)
        return x.float() @ w[:v].float().t()

    row["gemm_ms"] = timer(gemm, repeats)
    row["gemm_tflops"] = 2 * n * d * v / row["gemm_ms"] / 1e9
    row["topk_torch_ms"] = timer(lambda: head_topk(x, w, k, v, impl="torch"), repeats)
    row["topk_triton_ms"] = timer(lambda: head_topk(x, w, k, v, impl="triton"), repeats) if can_triton else None
    row["topk_torch_gemm_ratio"] = row["gemm_ms"] / row["topk_torch_ms"]
    row["topk_triton_gemm_ratio"] = row["gemm_ms"] / row["topk_triton_ms"] if can_triton else None
    if topk_only:
        return row

    # Training: one teacher record per layer, a student x per layer (the verbalizer outputs).
    xs = [(torch.randn(n, d, generator=g) / d**0.5 * 4).to(dtype).to(device) for _ in range(layers)]
    teacher = head_topk(x, w, k, v, impl="torch")
    tgt = teacher.ids[:, 0].long()

    def step(loss_of):
        def run():
            total = 0.0
            for xi in xs:
                xi = xi.detach().requires_grad_(True)
                loss = loss_of(xi).mean()
                loss.backward()
                total += float(loss.detach())
            return total
        return run

    def fused(impl):
        return step(lambda xi: sparse_kl_from_hidden(xi, w, teacher.ids, teacher.logprobs, teacher.tail,
                                                     real_vocab=v, impl=impl))

    unfused = step(lambda xi: coarse_kl((xi @ w.t()).float(), teacher.ids, teacher.logprobs, teacher.tail,
                                        real_vocab=v))
    plain_ce = step(lambda xi: F.cross_entropy((xi @ w[:v].t()).float(), tgt, reduction="none"))
    cases = {"kl_chunked_torch": fused("torch"), "kl_unfused": unfused, "ce_plain": plain_ce}
    if can_triton:
        cases["kl_fused_triton"] = fused("triton")
    for name, fn in cases.items():
        row[f"{name}_ms"] = timer(fn, max(1, repeats // 2))
        row[f"{name}_peak_mb"] = _peak_mb(device, fn)
    for name in cases:
        row[f"{name}_speed_vs_ce"] = row["ce_plain_ms"] / row[f"{name}_ms"]
        if row["ce_plain_peak_mb"]:
            row[f"{name}_peak_vs_ce"] = row[f"{name}_peak_mb"] / row["ce_plain_peak_mb"]
    row["train_tokens"] = n * layers
    return row


def _fmt(v):
    if v is None:
        return "n/a"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--shapes", default=None, help=f"comma list of TOKENSxHIDDENxVOCAB (default {DEFAULT_SHAPES})")
@click.option("--small", is_flag=True, help=f"CPU-sized shapes ({SMALL_SHAPES}), fp32")
@click.option("--k", "k", default=64, show_default=True, help="top-k")
@click.option("--layers", default=8, show_default=True, help="heads per training step (7 verbalized + final)")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, help="default bf16 (fp32 with --small)")
@click.option("--repeats", default=5, show_default=True)
@click.option("--topk-only", is_flag=True, help="only the extraction part (GEMM vs head top-k), no training losses")
@click.option("--out", "out_path", default="kernels_bench.json", show_default=True, help="JSON results")
def main(shapes, small, k, layers, dtype, repeats, topk_only, out_path):
    import torch

    from vlsi.ops.dispatch import triton_importable

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp32" if small else "bf16")
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    shapes = shapes or (SMALL_SHAPES if small else DEFAULT_SHAPES)
    # Triton timings only mean something compiled on a GPU (the interpreter is a correctness tool).
    can_triton = device.type == "cuda" and triton_importable()
    rows = []
    for spec in shapes.split(","):
        n, d, v = (int(p) for p in spec.lower().split("x"))
        rows.append(bench_shape(n, d, v, k=k, layers=layers, dtype=tdtype, device=device, repeats=repeats,
                                can_triton=can_triton, topk_only=topk_only))
        r = rows[-1]
        click.echo(f"\n== {n} x {d} x {v}  ({r['dtype']}, k={k}, {r['device']})")
        click.echo(f"  extraction  gemm {_fmt(r['gemm_ms'])} ms ({_fmt(r['gemm_tflops'])} TFLOP/s) | "
                   f"topk torch {_fmt(r['topk_torch_ms'])} ms = {_fmt(r['topk_torch_gemm_ratio'])} of GEMM rate | "
                   f"topk triton {_fmt(r['topk_triton_ms'])} ms = {_fmt(r['topk_triton_gemm_ratio'])} of GEMM rate")
        if topk_only:
            continue
        click.echo(f"  training ({layers} heads, fwd+bwd)    {'ms':>9} {'speed/CE':>9} {'peak MB':>9} {'peak/CE':>8}")
        for name in ("ce_plain", "kl_unfused", "kl_chunked_torch", "kl_fused_triton"):
            if f"{name}_ms" in r:
                click.echo(f"    {name:<30} {_fmt(r[f'{name}_ms']):>9} {_fmt(r[f'{name}_speed_vs_ce']):>9} "
                           f"{_fmt(r[f'{name}_peak_mb']):>9} {_fmt(r.get(f'{name}_peak_vs_ce')):>8}")
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
    click.echo(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
