"""Trainer step cost: (a) plain SFT vs (b) VLsI interaction from cached teacher top-k, same student, same data.

One run, one random student (Qwen2 LLM shapes, LoRA r = alpha = 64 on its decoder linears as vlsi-train does), the
same batches. (a) = backbone fwd/bwd + chunked CE of the native head on the answer rows (``sft_loss``);
(b) = backbone fwd/bwd + ts verb-FFN verbalizers (frozen) + the no-grad [ts x tl] KL matrix + layer matching +
chunked sparse KL at the matched pairs and the final layer (``interaction_loss``), teacher targets synthetic
top-k records shaped like a cache's. Prints tokens/s and peak memory of each and b/a.

    python bench/train_bench.py --small                 # 2-core CPU smoke figures
    python bench/train_bench.py --shape 2b-random       # GPU: hidden 1536, vocab 151,936 (layers reducible)

Targets (GPU at real vocab): speed b/a >= 0.7, peak memory b/a <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab (real = padded here)
    "small": dict(hidden=64, layers=4, heads=4, kv=2, inter=128, vocab=4000),
    "2b-random": dict(hidden=1536, layers=28, heads=12, kv=2, inter=8960, vocab=151936),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--small", action="store_true", help="= --shape small, CPU-sized batches")
    ap.add_argument("--layers", type=int, default=None, help="override decoder layers (keeps hidden and vocab real)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--answer-frac", type=float, default=0.5, help="fraction of positions that are answer rows")
    ap.add_argument("--ts", type=int, default=7, help="student target layers")
    ap.add_argument("--tl", type=int, default=20, help="teacher target layers in the cache")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.small:
        args.shape = "small"

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vlsi.models.verbalizers import VerbalizerSet
    from vlsi.train.losses import TeacherTargets, interaction_loss, sft_loss

    sh = dict(SHAPES[args.shape])
    if args.layers:
        sh["layers"] = args.layers
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    B = args.batch or (4 if on_gpu else 2)
    T = args.seq or (1024 if on_gpu else 128)
    ts = min(args.ts, sh["layers"] - 1)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=sh["hidden"], num_hidden_layers=sh["layers"], num_attention_heads=sh["heads"],
                      num_key_value_heads=sh["kv"], intermediate_size=sh["inter"], vocab_size=sh["vocab"],
                      tie_word_embeddings=False, max_position_embeddings=max(4096, T))
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM(cfg).to(dev, dtype)
    init_s = time.perf_counter() - t0
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=64, lora_alpha=64, target_modules=r".*layers\.\d+\..*_proj"), model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            p.data = p.data.float()
    layers = sorted({round(i * (sh["layers"] - 1) / ts) for i in range(ts)})[:ts]
    vs = VerbalizerSet(layers, sh["hidden"]).to(dev, dtype).requires_grad_(False)
    V, k, tl = sh["vocab"], args.k, args.tl
    ids = torch.randint(0, V, (B, T), device=dev)
    n_ans = int(T * args.answer_frac)
    pos = torch.arange(T - n_ans - 1, T - 1, device=dev)  # answer rows at the end of each sample
    N = B * n_ans
    g = torch.Generator(device="cpu").manual_seed(1)
    lp = torch.log_softmax(torch.randn(N, tl + 1, k, generator=g) * 2, -1) - 0.3  # top-k mass ~0.74
    targets = TeacherTargets(torch.randint(0, V, (N, tl + 1, k), generator=g, dtype=torch.int32).to(dev),
                             lp.sort(-1, descending=True).values.to(dev), torch.full((N, tl + 1), -1.35).to(dev))
    answer_targets = ids[:, pos + 1].reshape(-1)
    head = model.lm_head.weight
    base, norm = model.model, model.model.norm
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else (lambda: torch.autocast("cpu", enabled=False))

    def hidden(with_layers):
        captured = {}
        hooks = [base.layers[i].register_forward_hook(
            lambda m, a, o, i=i: captured.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[:, pos].reshape(N, -1)))
            for i in (layers if with_layers else [])]
        out = base(input_ids=ids, use_cache=False).last_hidden_state[:, pos].reshape(N, -1)
        for h in hooks:
            h.remove()
        return captured, out

    def step_sft():
        with autocast():
            _, xf = hidden(False)
            loss = sft_loss(xf, head, answer_targets, real_vocab=V, n_norm=N, chunk_tokens=args.chunk_tokens)
        loss.backward()

    gen = torch.Generator().manual_seed(0)

    def step_interact():
        with autocast():
            cap, xf = hidden(True)
            xs = [norm(vs(i, cap[i])) for i in layers]
            res = interaction_loss(xs, xf, head, targets, answer_targets, real_vocab=V, n_norm=N,
                                   match_kwargs=dict(rule="multinomial"), generator=gen, chunk_tokens=args.chunk_tokens)
        res.loss.backward()

    def measure(fn):
        fn()  # warm-up
        model.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
            model.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
        return {"step_s": dt, "tokens_per_s": B * T / dt, "answer_tokens_per_s": N / dt, "peak_mb": peak}

    a = measure(step_sft)
    b = measure(step_interact)
    res = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "shape": args.shape, **sh, "batch": B,
           "seq": T, "answer_rows": N, "ts": len(layers), "tl": tl, "k": k, "init_s": init_s, "sft": a,
           "interact": b, "speed_ratio_b_over_a": b["tokens_per_s"] / a["tokens_per_s"],
           "memory_ratio_b_over_a": (b["peak_mb"] / a["peak_mb"]) if on_gpu else None}
    print(f"device {res['device']} | shape {args.shape} hidden {sh['hidden']} layers {sh['layers']} vocab {V} | "
          f"B {B} T {T} answer rows {N} | ts {len(layers)} tl {tl} k {k}")
    for name, r in (("(a) sft", a), ("(b) interact", b)):
        mem = f"{r['peak_mb']:.0f} MiB" if r["peak_mb"] is not None else "n/a (CPU)"
        print(f"{name:14s} {r['tokens_per_s']:10.1f} tok/s  {r['step_s'] * 1e3:8.1f} ms/step  peak {mem}")
    mr = res["memory_ratio_b_over_a"]
    print(f"b/a speed {res['speed_ratio_b_over_a']:.3f} (target >= 0.7)   b/a memory "
          f"{'n/a' if mr is None else f'{mr:.3f}'} (target <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
