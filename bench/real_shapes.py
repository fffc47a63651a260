"""Real-width shapes on CPU: a Qwen2-VL-72B-shaped teacher and a Qwen2-VL-2B-shaped student through the project's
own entry points, with peak RSS per phase and the largest tensors each phase allocated.

    python bench/real_shapes.py                        # ~5B-parameter teacher (10 GB bf16), 24 GB machine, 2 cores
    python bench/real_shapes.py --json real_shapes.json --work /tmp/rs --keep
    python bench/real_shapes.py --small                # the same pipeline at test widths (seconds)

Models (random weights, built from config by ``vlsi.demo.tiny``'s writers, one tokenizer shared):

- teacher: Qwen2-VL-72B widths (hidden 8192, 64 heads / 8 KV heads, intermediate 29,568, embedding + LM head
  padded to 152,064 rows, M-RoPE 16/24/24) with the decoder cut to ``--teacher-layers`` (3) and a 1-block vision
  tower of the 72B's width (1280, 16 heads, merger to 8192): ~5B parameters, ~10 GB in bf16;
- student: Qwen2-VL-2B widths (hidden 1536, 12 heads / 2 KV heads, intermediate 8960, head padded to 151,936),
  2 decoder layers, 1 vision block;
- tokenizer: the demo's byte-level BPE filled up with special tokens to 151,646 entries (Qwen2-VL's real
  vocabulary), so every softmax / top-k / KL runs over 151,646 columns while the two heads are padded to two
  OTHER sizes (152,064 and 151,936).

Phases (each through its real entry point, in this process): write models; ``vlsi.train.recipe.run_verbalize``
(teacher in bf16, verbalizers at teacher layers 0 and 1, 1 step); ``vlsi.extract.run.run_extract`` (4 samples with
images, k = 64); ``vlsi.train.recipe.run`` (student: interact 2 steps + sft 1, LoRA). Peak RSS is reset between
phases (``/proc/self/clear_refs``), and a ``TorchDispatchMode`` records every tensor an op allocates: the largest
one, the largest ``[rows x vocab]`` one (2-D float with a vocab's columns, real or padded, or ``head_topk``'s vocab
tile widths; fresh storage, not a view of a weight) and the most ``[rows x vocab]`` bytes alive at once. The claim checked: no phase ever holds ``[tokens x vocab]`` fp32 for
several layers; the biggest such tensor is one chunk (training: ``--chunk-tokens`` rows x the real vocab;
extraction: ``head_topk``'s 1024 rows x 32,768-column tiles) and the weight's fp32 upcast on CPU goes by blocks of
``vlsi.ops._numerics.UPCAST_BLOCK_ELEMS``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import click

GiB = 2**30
REAL_VOCAB = 151_646  # Qwen2-VL's tokenizer entries (of 152,064 / 151,936 head rows)
QWEN_72B_TEXT = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=29568)
QWEN_72B_VISION = dict(depth=1, embed_dim=1280, num_heads=16, mlp_ratio=4)
QWEN_2B_TEXT = dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960)
QWEN_2B_VISION = dict(depth=1, embed_dim=1280, num_heads=16, mlp_ratio=4)
PADDED_TEACHER, PADDED_STUDENT = 152_064, 151_936


# ---- memory accounting ---------------------------------------------------------------------------------------------


def _status_gib(field: str) -> float:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 / GiB if m else float("nan")


def rss_gib() -> float:
    return _status_gib("VmRSS")


def peak_rss_gib() -> float:
    return _status_gib("VmHWM")


def reset_peak_rss() -> None:
    """Peak RSS := current RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next phase starts from what is live
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


class RssSampler:
    """Samples /proc/self/status every ``period`` s in a thread: the most anonymous memory (what the process
    allocated: tensors, activations, optimizer state) and the most file-backed memory (pages of memory-mapped
    files: safetensors weights loaded without a copy) resident at once."""

    def __init__(self, period: float = 0.1):
        import threading

        self.period, self.anon, self.file = period, 0.0, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_gib("RssAnon"))
            self.file = max(self.file, _status_gib("RssFile"))
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class TensorWatch:
    """A TorchDispatchMode recording the tensors ops allocate (fresh storage only: views and in-place results are
    not new memory). Tracks the largest tensor, the largest ``[rows x vocab]`` tensor (2-D float, a column count
    ``is_vocab_cols`` accepts) and the most bytes of such tensors alive at once (freed when their Python tensor
    dies)."""

    def __init__(self, is_vocab_cols=lambda cols: cols >= 16_384):
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                watch._see(func, args, kwargs, out)
                return out

        self._mode = _Mode()
        self.is_vocab_cols = is_vocab_cols
        self.largest = None
        self.largest_logits = None
        self.alive_logits = 0
        self.peak_alive_logits = 0
        self.n_logits = 0

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @staticmethod
    def _ptrs(obj, acc):
        import torch

        if isinstance(obj, torch.Tensor):
            try:
                acc.add(obj.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                pass
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                TensorWatch._ptrs(o, acc)
        elif isinstance(obj, dict):
            for o in obj.values():
                TensorWatch._ptrs(o, acc)
        return acc

    def _see(self, func, args, kwargs, out) -> None:
        import torch

        outs = out if isinstance(out, (list, tuple)) else (out,)
        ins = None
        for t in outs:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
                continue
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            if ins is None:
                ins = self._ptrs((args, kwargs), set())
            if ptr in ins:
                continue  # a view or an in-place result: no new memory
            nbytes = t.numel() * t.element_size()
            rec = (nbytes, tuple(t.shape), str(t.dtype).replace("torch.", ""), str(func.overloadpacket.__name__))
            if self.largest is None or nbytes > self.largest[0]:
                self.largest = rec
            if t.dim() == 2 and self.is_vocab_cols(int(t.shape[-1])) and t.dtype.is_floating_point:
                self.n_logits += 1
                if self.largest_logits is None or nbytes > self.largest_logits[0]:
                    self.largest_logits = rec
                self.alive_logits += nbytes
                self.peak_alive_logits = max(self.peak_alive_logits, self.alive_logits)
                weakref.finalize(t, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.alive_logits -= nbytes


def _fmt_t(rec) -> str:
    if rec is None:
        return "-"
    nbytes, shape, dtype, op = rec
    return f"{'x'.join(map(str, shape))} {dtype} ({nbytes / 2**20:.1f} MiB, {op})"


# ---- models and data -----------------------------------------------------------------------------------------------


def big_tokenizer(n_total: int):
    """The demo's Qwen2-VL tokenizer filled up with special tokens to ``n_total`` entries."""
    from vlsi.demo.tiny import build_tokenizer

    tok = build_tokenizer(family="qwen2_vl")
    tok.add_tokens([f"<|vlsi_fill_{i}|>" for i in range(n_total - len(tok))], special_tokens=True)
    assert len(tok) == n_total
    return tok


def write_model(out: Path, tok, *, size: str, padded_vocab: int, layers: int, text: dict, vision: dict, dtype,
                seed: int, max_shard_size: str = "1GB") -> tuple[Path, int]:
    """A random-weight Qwen2-VL directory of the given widths (``vlsi.demo.tiny`` config + processor + tokenizer);
    returns (dir, parameter count)."""
    import torch

    from vlsi.demo.tiny import _mrope_section, make_config, make_image_processor, model_class

    cfg = make_config("qwen2_vl", size, tok, num_layers=layers)
    tc = cfg.text_config
    for k, v in dict(text, vocab_size=padded_vocab).items():
        setattr(tc, k, v)
    tc.rope_parameters = dict(tc.rope_parameters,
                              mrope_section=_mrope_section(tc.hidden_size // tc.num_attention_heads))
    vc = cfg.vision_config
    for k, v in dict(vision, hidden_size=tc.hidden_size).items():
        setattr(vc, k, v)
    cfg.vocab_size = padded_vocab
    torch.manual_seed(seed)
    model = model_class("qwen2_vl")._from_config(cfg, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.generation_config.eos_token_id = tc.eos_token_id
    model.generation_config.pad_token_id = tc.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    del model
    tok.save_pretrained(out)
    make_image_processor("qwen2_vl").save_pretrained(out)
    return out, n_params


def image_samples(work: Path, n: int) -> Path:
    """``n`` procedural VQA samples that all have images (LLaVA JSON)."""
    from vlsi.demo.vqa import generate_vqa

    paths = generate_vqa(work / "vqa", n_train=4 * n, n_val=1, n_test=1, seed=0, image_size=56)
    rows = [r for r in json.loads(paths["train"].read_text()) if r.get("image") or r.get("images")][:n]
    assert len(rows) == n
    out = work / "vqa" / "images4.json"
    out.write_text(json.dumps(rows))
    return out


# ---- the run --------------------------------------------------------------------------------------------------------


def run(work: Path, *, small: bool, teacher_layers: int, samples: int, chunk_tokens: int, top_k: int) -> dict:
    import torch

    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract
    from vlsi.models import VerbalizerSet, load_model
    from vlsi.train.config import TrainConfig, VerbalizeConfig
    from vlsi.train.recipe import run as run_train
    from vlsi.train.recipe import run_verbalize

    if small:  # the same pipeline at test widths: the bench's own smoke test
        real, p_t, p_s = 900, 1024, 960
        t_text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        s_text = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
        t_vis = s_vis = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2)
    else:
        real, p_t, p_s = REAL_VOCAB, PADDED_TEACHER, PADDED_STUDENT
        t_text, s_text, t_vis, s_vis = QWEN_72B_TEXT, QWEN_2B_TEXT, QWEN_72B_VISION, QWEN_2B_VISION
    phases: list[dict] = []
    t_all = time.perf_counter()

    # a logits tile: a 2-D float tensor with a vocab's columns (real or padded: the training losses) or
    # head_topk's vocab tile widths (32,768 and the last tile's remainder: extraction)
    vocab_cols = {real, p_t, p_s, min(real, 32_768), real % 32_768 or 32_768}

    def phase(name: str, fn, **facts):
        reset_peak_rss()
        base = rss_gib()
        t0 = time.perf_counter()
        with RssSampler() as rs, TensorWatch(lambda cols: cols in vocab_cols) as tw:
            res = fn()
        row = {"phase": name, "wall_s": time.perf_counter() - t0, "rss_start_gib": base,
               "peak_rss_gib": peak_rss_gib(), "peak_anon_gib": rs.anon, "peak_file_gib": rs.file,
               "largest_tensor": tw.largest, "largest_rows_x_vocab": tw.largest_logits,
               "rows_x_vocab_tensors": tw.n_logits, "peak_alive_rows_x_vocab_mib": tw.peak_alive_logits / 2**20,
               **facts}
        phases.append(row)
        print(f"[{name}] {row['wall_s']:.0f}s, peak RSS {row['peak_rss_gib']:.2f} GiB "
              f"(start {base:.2f}; allocated <= {rs.anon:.2f}, mapped files <= {rs.file:.2f}); largest {_fmt_t(tw.largest)}; largest rows x vocab "
              f"{_fmt_t(tw.largest_logits)}; peak alive rows x vocab {row['peak_alive_rows_x_vocab_mib']:.0f} MiB",
              flush=True)
        return res

    tok = big_tokenizer(real)
    data = image_samples(work, samples)
    teacher, n_teacher = phase("write teacher", lambda: write_model(
        work / "teacher", tok, size="teacher", padded_vocab=p_t, layers=teacher_layers, text=t_text, vision=t_vis,
        dtype=torch.bfloat16, seed=1))
    student, n_student = phase("write student", lambda: write_model(
        work / "student", tok, size="student", padded_vocab=p_s, layers=2, text=s_text, vision=s_vis,
        dtype=torch.bfloat16, seed=2))
    t_layers = tuple(range(teacher_layers - 1))  # every layer but the last (it has the model's own head)
    d_t = t_text["hidden_size"]
    vsum = phase("verbalize (teacher)", lambda: run_verbalize(VerbalizeConfig(
        model=str(teacher), data=str(data), out=str(work / "teacher_verb"), layers=t_layers, steps=1,
        batch_size=samples, lr=1e-4, device="cpu", dtype="bf16", progress=False, chunk_tokens=chunk_tokens)),
        teacher_params=n_teacher, weights_gib=n_teacher * 2 / GiB,
        trainable_gib=len(t_layers) * 3 * d_t * d_t * 16 / GiB)  # fp32 weights + grads + Adam m, v
    esum = phase("extract (teacher)", lambda: run_extract(ExtractConfig(
        teacher=str(teacher), verbalizers=str(work / "teacher_verb"), data=str(data), out=str(work / "cache"),
        top_k=top_k, device="cpu", dtype="bf16", batch_size=samples, progress=False)),
        teacher_params=n_teacher, weights_gib=(n_teacher + len(t_layers) * 3 * d_t * d_t) * 2 / GiB)

    def student_verbalizers():
        ad = load_model(student, device="cpu")
        vs = VerbalizerSet.for_model(ad, [0])
        with torch.no_grad():
            for p in vs.parameters():
                p.normal_(0, 0.02)
        vs.save(work / "student_verb", ad.fingerprint())
        return ad.vocab_size, ad.padded_vocab_size

    s_vocab = phase("student verbalizers", student_verbalizers)
    tsum = phase("train (student)", lambda: run_train(TrainConfig(
        cache=str(work / "cache"), student=str(student), data=str(data), out=str(work / "train"),
        student_verbalizers=str(work / "student_verb"), stages=("interact", "sft"), interact_steps=2, sft_steps=1,
        batch_size=samples, lora_rank=8, lr=1e-4, device="cpu", progress=False, chunk_tokens=chunk_tokens)),
        student_params=n_student, weights_gib=n_student * 4 / GiB)
    return {"small": small, "real_vocab": real, "padded_teacher": p_t, "padded_student": p_s,
            "tokenizer": len(tok), "student_vocab_seen": s_vocab, "teacher_params": n_teacher,
            "student_params": n_student, "teacher_layers": teacher_layers, "verbalizer_layers": list(t_layers),
            "samples": samples, "chunk_tokens": chunk_tokens, "top_k": top_k, "total_s": time.perf_counter() - t_all,
            "answer_tokens": esum["answer_tokens"], "input_tokens": esum["input_tokens"],
            "verbalize_loss": vsum["last_loss_per_layer"],
            "interact_finished": tsum["stages"]["interact"]["finished"], "sft_finished": tsum["stages"]["sft"]["finished"],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "phases": phases}


def table(res: dict) -> str:
    from vlsi.ops._numerics import UPCAST_BLOCK_ELEMS

    lines = [f"teacher {res['teacher_params'] / 1e9:.2f}B params ({res['teacher_layers']} decoder layers, head "
             f"{res['padded_teacher']} rows), student {res['student_params'] / 1e9:.2f}B (head {res['padded_student']} "
             f"rows), tokenizer {res['tokenizer']} = real vocab; {res['samples']} samples with images, "
             f"{res['input_tokens']} input / {res['answer_tokens']} answer tokens; chunk {res['chunk_tokens']} rows; "
             f"{res['threads']} threads; total {res['total_s']:.0f}s",
             "",
             "| phase | wall s | RSS at start GiB | peak RSS GiB | peak allocated (anon) GiB | peak mapped files GiB | "
             "known parts GiB | largest tensor allocated | largest [rows x vocab] | peak [rows x vocab] alive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["phases"]:
        known = []
        if "weights_gib" in p:
            known.append(f"weights {p['weights_gib']:.2f}")
        if "activations_note" in p:
            known.append(p["activations_note"])
        if "trainable_gib" in p:
            known.append(f"verbalizer fp32 + grad + Adam {p['trainable_gib']:.2f}")
        lines.append(f"| {p['phase']} | {p['wall_s']:.0f} | {p['rss_start_gib']:.2f} | {p['peak_rss_gib']:.2f} | "
                     f"{p['peak_anon_gib']:.2f} | {p['peak_file_gib']:.2f} | "
                     f"{', '.join(known) or '-'} | {_fmt_t(p['largest_tensor'])} | "
                     f"{_fmt_t(p['largest_rows_x_vocab'])} | {p['peak_alive_rows_x_vocab_mib']:.0f} MiB |")
    v = res["real_vocab"]
    lines += ["", f"bounds: one training logits tile <= chunk x real vocab x 4 B = {res['chunk_tokens']} x {v} x 4 = "
              f"{res['chunk_tokens'] * v * 4 / 2**20:.1f} MiB ({res['answer_tokens']} answer rows here); one "
              f"extraction tile <= 1024 x 32768 x 4 B = 128 MiB; fp32 upcast of a bf16 head block <= {UPCAST_BLOCK_ELEMS * 4 / 2**20:.0f} "
              f"MiB; a [tokens x vocab] fp32 tensor for all {len(res['verbalizer_layers']) + 1} heads of the batch "
              f"would be {res['answer_tokens'] * v * 4 * (len(res['verbalizer_layers']) + 1) / 2**20:.0f} MiB, and "
              f"at 8192 tokens x 152,064 x 21 heads {8192 * 152064 * 4 * 21 / GiB:.0f} GiB"]
    return "\n".join(lines)


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--work", type=click.Path(file_okay=False), default=None, help="work dir (default: a temp dir)")
@click.option("--keep", is_flag=True, help="keep the work dir (models, cache, runs)")
@click.option("--small", is_flag=True, help="test widths: the whole pipeline in seconds")
@click.option("--teacher-layers", default=3, show_default=True, help="teacher decoder depth")
@click.option("--samples", default=4, show_default=True, help="samples (all with images)")
@click.option("--chunk-tokens", default=4, show_default=True,
              help="answer rows per logits tile in the training losses (below the batch's answer rows, so the "
                   "tiling is exercised)")
@click.option("--top-k", default=64, show_default=True)
@click.option("--json", "json_path", default=None, help="write the results here")
def main(work, keep, small, teacher_layers, samples, chunk_tokens, top_k, json_path):
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="vlsi-real-shapes-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = run(work_dir, small=small, teacher_layers=teacher_layers, samples=samples, chunk_tokens=chunk_tokens,
                  top_k=top_k)
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(table(res))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
