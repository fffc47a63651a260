"""What a GenRecal feature cache costs, and what dropping its question rows costs in quality, on the tiny task.

    python bench/genrecal_feature_cache.py [--n-train 32] [--n-val 16] [--steps 60] [--no-quality]

1. Builds the tiny task of tests/train/test_genrecal.py (a Qwen2-VL teacher, a student with another tokenizer, the
   procedural VQA data with images), extracts ``--hidden-states answer`` and ``--hidden-states all`` (features
   only, top-k 8 of the final head) and reports, per sample, the stored bytes of each array family after compression
   (``vlsi-cache info``), the rows per sample, and the compressed bytes per stored bf16 element (raw: 2).
2. Compares byte shuffle and bitshuffle (blosc zstd 3) on the stored bf16 patterns.
3. Extrapolates to a 72B teacher (d = 8192) per 1M samples from ``--answer-tokens`` / ``--question-tokens`` per
   sample, at the raw 2 B per element and at the measured ratio (a tiny random model's states may compress
   differently from a real teacher's: the raw figure is the bound).
4. ``--quality``: stage 1 (recalibrate) for ``--steps`` with the paper's regulariser on the ``all`` cache, with the
   regulariser on answer rows only (``--genrecal-reg-rows answer``) and without it on the ``answer`` cache (what an
   answer-only cache allows), over ``--seeds`` seeds each; reports the held-out KL of the
   Recalibrator's main pass (val cache) before and after. Then the issue's stage-2 report: the student's held-out CE
   on its own answer tokens after ``recalibrate`` + ``joint`` (``--steps`` each) vs after the same number of
   student steps without the Recalibrator losses (the ``sft`` stage alone), and before any training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _sharpen(model_dir: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("lm_head.weight"))
    state[key] = state[key] * factor
    save_file(state, str(f), metadata={"format": "pt"})


def build(root: Path, n_train: int, n_val: int) -> dict:
    from vlsi.demo.tiny import build_tokenizer, default_corpus, write_tiny_model
    from vlsi.demo.vqa import generate_vqa

    tok_t = build_tokenizer(family="qwen2_vl")
    tok_s = build_tokenizer([t[::-1] for t in default_corpus()], vocab_size=420, family="qwen2_vl")
    teacher = write_tiny_model(root / "teacher", "qwen2_vl", tokenizer=tok_t, size="test", seed=1)
    student = write_tiny_model(root / "student", "qwen2_vl", tokenizer=tok_s, size="test", seed=2)
    _sharpen(teacher, 40.0)  # a peaked teacher, as in the tests (a random tiny one is near-uniform)
    splits = generate_vqa(root / "data", n_train=n_train, n_val=n_val, n_test=2, seed=0, image_size=56)
    return {"teacher": teacher, "student": student, **splits}


def extract(env: dict, split: str, out: Path, kind: str) -> dict:
    from vlsi.cache_format import open_cache
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    cfg = ExtractConfig(teacher=str(env["teacher"]), data=str(env[split]), out=str(out), hidden_states=kind,
                        top_k=8, batch_size=8, device="cpu", progress=False)
    cfg.check()
    run_extract(cfg)
    return open_cache(str(out)).info()


def shuffle_ratio(url: str) -> dict:
    """Compressed bytes per element of the stored hidden arrays under byte shuffle and bitshuffle."""
    import numpy as np
    from numcodecs import Blosc

    from vlsi.cache_format import open_cache

    rd = open_cache(url)
    arrs = [np.concatenate([r.hidden_answer] + ([r.hidden_question] if r.hidden_question is not None else []))
            for r in rd.iter()]
    bits = np.ascontiguousarray(np.concatenate(arrs))
    out = {}
    for name, sh in (("shuffle", Blosc.SHUFFLE), ("bitshuffle", Blosc.BITSHUFFLE)):
        c = Blosc(cname="zstd", clevel=3, shuffle=sh, typesize=2).encode(bits)
        out[name] = len(c) / bits.size
    return out


def quality(env: dict, caches: dict, root: Path, steps: int, seeds: int = 1) -> dict:
    from safetensors.torch import load_file

    from vlsi.cache_format import open_cache
    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.head_only import load_head_only
    from vlsi.train.config import TrainConfig
    from vlsi.train.genrecal import build_recalibrator, evaluate_recalibrator, run_genrecal
    from vlsi.train.genrecal_data import CacheFeatures, GenRecalDataset

    student = load_model(env["student"], device="cpu")
    head = load_head_only(env["teacher"], device="cpu")
    val = GenRecalDataset(open_dataset(env["val"]), CacheFeatures(open_cache(caches["val"])), student.bundle,
                          head.tokenizer, d_teacher=head.hidden_size, need_question=False)
    res = {}
    arms = (("all, regulariser on question + answer rows", caches["all"], 1.0, "question"),
            ("answer, regulariser on answer rows only", caches["answer"], 1.0, "answer"),
            ("answer, no regulariser", caches["answer"], 0.0, "question"))
    for i, (name, cache, reg, reg_rows) in enumerate(arms):
        r = res[name] = {"held_out_kl_before": [], "held_out_kl_after": [], "held_out_ce_after": [], "train_s": 0.0}
        for seed in range(seeds):  # one run per seed: the Recalibrator's init and the data order
            cfg = TrainConfig(seed=seed, method="genrecal", student=str(env["student"]),
                              teacher_head=str(env["teacher"]), data=str(env["train"]),
                              out=str(root / f"arm{i}-seed{seed}"), cache=cache, genrecal_reg_rows=reg_rows,
                              stages=("recalibrate",), recalibrate_steps=steps, batch_size=4, lr=3e-3, min_lr=3e-4,
                              genrecal_reg=reg, device="cpu", progress=False, max_grad_norm=None)
            before = evaluate_recalibrator(build_recalibrator(student, head, cfg), student, head, val)
            t0 = time.perf_counter()
            run_genrecal(cfg)
            r["train_s"] += time.perf_counter() - t0
            rec = build_recalibrator(student, head, cfg)
            rec.load_state_dict(load_file(str(Path(cfg.out) / "recalibrator" / "recalibrator.safetensors")))
            after = evaluate_recalibrator(rec, student, head, val)
            r["held_out_kl_before"].append(before["kl"])
            r["held_out_kl_after"].append(after["kl"])
            r["held_out_ce_after"].append(after["ce"])
            r["rows"] = after["rows"]
        r["mean_kl_after"] = sum(r["held_out_kl_after"]) / seeds
    # stage 2 vs the same student budget without the Recalibrator losses
    common = dict(method="genrecal", student=str(env["student"]), teacher_head=str(env["teacher"]),
                  data=str(env["train"]), cache=caches["all"], batch_size=4, lr=3e-3, min_lr=3e-4, lora_rank=4,
                  device="cpu", progress=False, max_grad_norm=None)
    joint = TrainConfig(out=str(root / "joint"), stages=("recalibrate", "joint"), recalibrate_steps=steps,
                        joint_steps=steps, **common)
    sft = TrainConfig(out=str(root / "sft"), stages=("sft",), sft_steps=steps, **common)
    res["student_ce_before"] = student_ce(env["student"], env["val"])
    for name, cfg in (("student_ce_after_recalibrate_joint", joint), ("student_ce_after_sft_same_steps", sft)):
        run_genrecal(cfg)
        res[name] = student_ce(Path(cfg.out) / "final", env["val"])
    return res


def student_ce(model_dir, data_path) -> float:
    """Mean next-token CE of a model on its own answer tokens of ``data_path`` (held out), one sample at a time."""
    import torch

    from vlsi.models.adapter import load_model
    from vlsi.models.dataset import open_dataset
    from vlsi.models.encoding import collate, encode_sample, pad_id_of

    m = load_model(model_dir, device="cpu")
    data = open_dataset(str(data_path))
    tot = n = 0.0
    with torch.no_grad():
        for i in range(len(data)):
            enc = encode_sample(data[i], m.bundle)
            z = m.forward_hidden(collate([enc], pad_id_of(m.tokenizer)), [], rows="answer").final_hidden.float()
            logits = z @ m.lm_head.weight.float()[: m.vocab_size].T
            tgt = enc.input_ids[enc.answer_positions + 1]
            tot += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
            n += len(tgt)
    return tot / max(1.0, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3, help="quality: runs per arm (seeds 0..N-1)")
    ap.add_argument("--answer-tokens", type=int, default=100, help="72B extrapolation: answer rows per sample")
    ap.add_argument("--question-tokens", type=int, default=700,
                    help="72B extrapolation: question rows per sample (image tokens + prompt)")
    ap.add_argument("--d-teacher", type=int, default=8192, help="72B extrapolation: the teacher's hidden size")
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    from _device import cpu_name

    print(f"device: {cpu_name()}")
    root = Path(tempfile.mkdtemp(prefix="genrecal-bytes-"))
    env = build(root, args.n_train, args.n_val)
    caches, out = {}, {"device": cpu_name(), "args": vars(args)}
    for kind in ("answer", "all"):
        caches[kind] = str(root / f"cache-{kind}")
        info = extract(env, "train", Path(caches[kind]), kind)
        n, d = info["n_samples"], info["hidden_size"]
        a_rows = info["n_answer_tokens"] / n
        from vlsi.cache_format import open_cache

        q_rows = sum(len(r.hidden_question) for r in open_cache(caches[kind]).iter()) / n if kind == "all" else 0.0
        row = {"samples": n, "d": d, "answer_rows_per_sample": a_rows, "question_rows_per_sample": q_rows,
               "bytes_per_sample_total": info["bytes_per_sample"],
               "hidden_answer_bytes_per_sample": info["hidden_answer_bytes_per_sample"],
               "hidden_question_bytes_per_sample": info.get("hidden_question_bytes_per_sample", 0.0),
               "stored_bytes_per_element_answer": info["hidden_answer_bytes_per_sample"] / max(1e-9, a_rows * d)}
        if kind == "all":
            row["stored_bytes_per_element_question"] = row["hidden_question_bytes_per_sample"] / max(1e-9, q_rows * d)
            row["shuffle_vs_bitshuffle_bytes_per_element"] = shuffle_ratio(caches[kind])
        out[kind] = row
        print(f"[{kind}] " + json.dumps(row))
    caches["val"] = str(root / "cache-val")
    extract(env, "val", Path(caches["val"]), "answer")
    # the blosc ratio over all stored states of the `all` cache (the per-array figures above carry the fixed overhead
    # of tiny arrays at d = 32; at d = 8192 that overhead vanishes)
    ratio = out["all"]["shuffle_vs_bitshuffle_bytes_per_element"]["shuffle"] / 2
    per_sample = {"answer": args.answer_tokens * args.d_teacher * 2,
                  "all": (args.answer_tokens + args.question_tokens) * args.d_teacher * 2}
    out["72b_per_1M_samples_TB"] = {k: {"raw": v * 1e6 / 1e12, "at_measured_ratio": v * ratio * 1e6 / 1e12}
                                   for k, v in per_sample.items()}
    out["measured_compression_ratio"] = ratio
    print("72B per 1M samples (TB): " + json.dumps(out["72b_per_1M_samples_TB"]) + f" (measured ratio {ratio:.3f})")
    if args.quality:
        out["quality"] = quality(env, caches, root, args.steps, args.seeds)
        for k, v in out["quality"].items():
            print(f"[quality] {k}: " + json.dumps(v))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
