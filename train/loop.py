"""``vlsi-train``: the student trainer, one readable loop per stage (torchtune / nanoGPT style).

``run(cfg)`` does, in order:

1. open the cache (read-only), load the student, refuse a tokenizer that does not match the cache's fingerprint;
2. join dataset + cache + student encoding (:mod:`vlsi.train.join`): content hashes, input ids and answer
   positions must agree, per ``--on-bad-sample``;
3. ``verbalize`` (VLsI step 1 for the student: ``vlsi.models.verbalize.run`` into ODIR/verbalizers), or load
   ``--student-verbalizers``;
4. ``interact`` (step 2): per micro-batch, the no-grad ``[ts x tl]`` KL matrix -> layer matching -> sparse KL with
   grad at the matched pairs + the final layer (:func:`vlsi.train.losses.interaction_loss`); LoRA (or the whole
   LLM) trains, verbalizers frozen unless ``--train-verbalizers``;
5. ``sft`` (step 3): next-token CE of the native head on the answers;
6. ODIR/final: LoRA merged into a plain transformers directory with tokenizer + processor files.

Each stage has its own AdamW + cosine schedule (restarted per stage, as in the paper). The same LoRA adapter
continues from interact into sft (one set of adapter weights, merged once at export). Gradient accumulation
normalises by the window's answer-row count, so G micro-batches equal one batch of their union (up to matching,
which is drawn per micro-batch = the per-GPU batch).

Exact resume: a checkpoint holds the trainable weights, optimizer, scheduler, every RNG (incl. the matching
generator), the data position (epoch, batch) and the stage; ODIR/progress.json lists finished stages.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vlsi.models.errors import VlsiError

from .config import TrainConfig

__all__ = ["run", "StageSpec"]

# Settings that must not change across a resume: they change data order, the optimisation or the method.
_RESUME_KEYS = ("stages", "steps", "epochs", "verbalize_steps", "interact_steps", "sft_steps", "batch_size",
                "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "max_grad_norm", "lora_rank",
                "lora_alpha", "lora_dropout", "full", "train_all", "seed", "train_verbalizers", "match", "match_range",
                "match_order", "adaptive_temp", "match_scale", "match_k", "il_loss", "ll_loss", "kl_direction",
                "temperature", "max_length", "on_bad_sample")


@dataclass
class StageSpec:
    """What one optimisation stage needs (plain values; no config object inside the loop)."""

    name: str
    total_steps: int
    needs_teacher: bool


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns a JSON-able summary (also written to ODIR/summary.json)."""
    import torch

    from vlsi.cache_format import CacheError, open_cache
    from vlsi.models.adapter import load_model
    from vlsi.models.trainutil import latest_checkpoint, seed_everything

    from .join import JoinError, JoinedDataset, check_student_fingerprint, join_samples
    from .lora import apply_lora, enable_full_training

    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    progress = _read_progress(out)
    if (resume_from is not None or progress["done"]) and not cfg.resume:
        raise VlsiError(f"{out}: holds a previous run (checkpoints/progress.json); pass --resume or use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    _check_resume_config(out, cfg)
    cfg.save(out / "config.yaml")
    seed_everything(cfg.seed)

    reader = None  # no cache: stages that need no teacher (verbalize, sft) train from the dataset alone
    if cfg.cache is not None:
        try:
            reader = open_cache(cfg.cache, storage_options=cfg.storage_options or None)
        except CacheError as e:
            raise JoinError(f"cannot open cache: {e}") from None
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    adapter = load_model(cfg.student, dtype=dtype, device=cfg.device)
    if reader is not None:
        check_student_fingerprint(reader, adapter.tokenizer, url=cfg.cache)
    try:
        samples, report = join_samples(cfg.data, reader, adapter.bundle, image_root=cfg.image_root,
                                       max_length=cfg.max_length, on_bad_sample=cfg.on_bad_sample,
                                       verify=cfg.verify_join, progress=cfg.progress)
    except CacheError as e:  # a corrupted chunk read during the join: refuse before any training
        raise JoinError(f"cache {cfg.cache} is unreadable: {e}") from None
    if report.count:
        report.write(out / "bad_samples.jsonl")
    teacher_layers = list(reader.fingerprint.target_layers) if reader is not None else []

    # ---- step 1: the student's verbalizers --------------------------------------------------------------------
    vs = None
    if "interact" in cfg.stages or "verbalize" in cfg.stages:
        vs = _student_verbalizers(cfg, adapter, progress, out)

    # ---- what trains ----------------------------------------------------------------------------------------------
    if cfg.full or cfg.train_all:
        enable_full_training(adapter, everything=cfg.train_all)
    else:
        apply_lora(adapter, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
        for n, p in adapter.model.named_parameters():
            if p.requires_grad:  # fp32 master weights for the adapters, whatever the base dtype
                p.data = p.data.float()
    if cfg.grad_checkpointing:
        adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if vs is not None:
        vs.requires_grad_(cfg.train_verbalizers)
    adapter.model.train()  # dropout stays as configured (the supported families use 0 attention dropout)

    modules = [("model", adapter.model)] + ([("verbalizers", vs)] if vs is not None else [])
    if resume_from is not None:
        _load_weights(resume_from, modules)

    dataset = JoinedDataset(samples, cfg.cache, adapter.bundle, storage_options=cfg.storage_options or None,
                            max_length=cfg.max_length)
    n_batches = math.ceil(len(samples) / cfg.batch_size)
    summary = {"out": str(out), "student": adapter.name, "samples": len(samples), "skipped": report.count,
               "teacher_layers": teacher_layers, "student_layers": list(vs.layers) if vs is not None else None,
               "stages": {}}
    from vlsi.models.trainutil import JsonlLogger

    with JsonlLogger(out / "metrics.jsonl") as log, _tensorboard(cfg, out) as tb:
        for name in ("interact", "sft"):
            if name not in cfg.stages or name in progress["done"]:
                continue
            steps = cfg.stage_steps(name)
            total = steps if steps is not None else max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))
            dataset.with_targets = name == "interact"
            res = _train_stage(StageSpec(name, total, name == "interact"), cfg, adapter, vs, dataset, log, tb,
                               ckpt_root, modules, teacher_layers)
            summary["stages"][name] = res
            if not res["finished"]:
                summary["finished"] = False
                _write_json(out / "summary.json", summary)
                return summary
            progress["done"].append(name)
            _write_json(out / "progress.json", progress)

    from .export import export_final

    summary["final"] = str(export_final(adapter, out / "final", provenance={
        "cache": cfg.cache, "cache_fingerprint_digest": reader.fingerprint.digest() if reader is not None else None, "stages": list(cfg.stages),
        "teacher_layers": teacher_layers, "student_layers": summary["student_layers"]}))
    summary["finished"] = True
    _write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# one stage


def _train_stage(spec: StageSpec, cfg: TrainConfig, adapter, vs, dataset, log, tb, ckpt_root, modules,
                 teacher_layers) -> dict:
    import torch

    from vlsi.models.trainutil import Meter, cosine_schedule, latest_checkpoint, load_checkpoint, save_checkpoint
    from vlsi.models.verbalizers import verbalized_states

    from .losses import interaction_loss, sft_loss

    params = [p for _, m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        raise VlsiError(f"stage {spec.name}: nothing to train")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, total_steps=spec.total_steps, warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr)
    match_gen = torch.Generator().manual_seed(cfg.seed * 7919 + (1 if spec.name == "interact" else 2))
    step, epoch, batch_idx = 0, 0, 0
    latest = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if latest is not None and _checkpoint_stage(latest) == (spec.name, False):
        trainable, state = load_checkpoint(latest, optimizer=opt, scheduler=sched)
        step, epoch, batch_idx = state["step"], state["position"]["epoch"], state["position"]["batch"]
        match_gen.set_state(state["extra"]["match_rng"])

    device = adapter.device
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    head_w = adapter.lm_head.weight.detach()
    real_vocab = adapter.vocab_size
    pad_id = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else adapter.tokenizer.eos_token_id
    stream = _BatchStream(dataset, cfg, pad_id, epoch, batch_idx)
    meter = Meter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.total_steps, initial=step, desc=spec.name, unit="step", dynamic_ncols=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    steps_this_run, last = 0, {}
    try:
        while step < spec.total_steps:
            t0 = time.perf_counter()
            window = [stream.next() for _ in range(cfg.grad_accum)]
            n_norm = sum(b.num_answer_rows for b, _ in window)  # the window's answer rows: accumulation-invariant
            opt.zero_grad(set_to_none=True)
            rec = {"stage": spec.name, "matched": [], "il": 0.0, "ll": 0.0, "loss": 0.0}
            layer_sum, final_sum = None, 0.0
            for batch, targets in window:
                answer_targets = batch.answer_targets.to(device)
                with autocast():
                    if spec.name == "interact":
                        states, hid = verbalized_states(vs, adapter, batch, backbone_grad=True)
                        res = interaction_loss(
                            [states[i] for i in vs.layers], hid.final_hidden, head_w, targets.to(device),
                            answer_targets, real_vocab=real_vocab, n_norm=n_norm, il_loss=cfg.il_loss,
                            ll_loss=cfg.ll_loss, direction=cfg.kl_direction, temperature=cfg.temperature,
                            match_kwargs=cfg.match_kwargs, generator=match_gen, chunk_tokens=cfg.chunk_tokens)
                        loss = res.loss
                    else:
                        hid = adapter.forward_hidden(batch, [], rows="answer")
                        loss = sft_loss(hid.final_hidden, adapter.lm_head.weight, answer_targets, real_vocab=real_vocab,
                                        n_norm=n_norm, chunk_tokens=cfg.chunk_tokens)
                loss.backward()
                rows = batch.num_answer_rows
                rec["loss"] += float(loss.detach())
                if spec.name == "interact":
                    rec["il"] += res.terms["il"]
                    rec["ll"] += res.terms["ll"]
                    if res.matching is not None:
                        rec["matched"].append(list(res.matching.matched))
                    vals = [v * rows for v in res.layer_kl]
                    layer_sum = vals if layer_sum is None else [a + b for a, b in zip(layer_sum, vals)]
                    final_sum += (res.final or 0.0) * rows
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            step += 1
            steps_this_run += 1
            n_samples = sum(len(b) for b, _ in window)
            n_tokens = sum(b.num_tokens for b, _ in window)
            meter.update(n_samples, n_tokens)
            dt = time.perf_counter() - t0
            rec.update(step=step, epoch=stream.epoch, lr=lr, grad_norm=grad_norm, samples=n_samples, tokens=n_tokens,
                       answer_tokens=n_norm, step_s=dt, tokens_per_s=n_tokens / dt, answer_tokens_per_s=n_norm / dt,
                       memory=_memory(device))
            if spec.name == "interact":
                rec["layer_kl"] = [v / n_norm for v in layer_sum] if layer_sum else []
                rec["final_kl"] = final_sum / n_norm if cfg.ll_loss != "none" else None
                rec["student_layers"] = list(vs.layers)
                rec["teacher_layers"] = teacher_layers
            else:
                del rec["matched"], rec["il"], rec["ll"]
            log.log(rec)
            last = rec
            if tb is not None:
                for k in ("loss", "il", "ll", "lr", "tokens_per_s", "final_kl"):
                    if isinstance(rec.get(k), (int, float)):
                        tb.add_scalar(f"{spec.name}/{k}", rec[k], step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {rec['loss']:.4f} | {meter.rates()['samples_per_s']:.1f} samp/s "
                                    f"{meter.rates()['tokens_per_s']:.0f} tok/s")
            done = step >= spec.total_steps
            stopping = cfg.stop_after is not None and steps_this_run >= cfg.stop_after
            if done or stopping or (cfg.save_every and step % cfg.save_every == 0):
                from .lora import trainable_state

                save_checkpoint(ckpt_root, _global_step(spec.name, step), trainable=trainable_state(*modules),
                                optimizer=opt, scheduler=sched,
                                position={"epoch": stream.epoch, "batch": stream.batch_idx},
                                extra={"stage": spec.name, "stage_done": done, "match_rng": match_gen.get_state()},
                                keep=cfg.keep_checkpoints)
            if stopping and not done:
                break
    finally:
        if bar is not None:
            bar.close()
    return {"step": step, "total_steps": spec.total_steps, "finished": step >= spec.total_steps,
            "last_loss": last.get("loss"), **meter.rates()}


def _global_step(stage: str, step: int) -> int:
    # Checkpoint directories sort by (stage, step): sft's come after interact's.
    return {"interact": 0, "sft": 1}[stage] * 10_000_000 + step


class _BatchStream:
    """Micro-batches in (epoch, batch) order from a DataLoader with read-ahead workers; tracks the position of the
    batches CONSUMED (not the ones prefetched), which is what a checkpoint records."""

    def __init__(self, dataset, cfg: TrainConfig, pad_id: int, epoch: int, batch_idx: int):
        self.dataset, self.cfg, self.pad_id = dataset, cfg, pad_id
        self.epoch, self.batch_idx = epoch, batch_idx
        self._it = None

    def _open(self):
        import torch

        from vlsi.models.trainutil import epoch_order

        from .join import collate_joined

        order = epoch_order(len(self.dataset), seed=self.cfg.seed, epoch=self.epoch)
        bs = self.cfg.batch_size
        batches = [order[i:i + bs] for i in range(self.batch_idx * bs, len(order), bs)]
        kw = {}
        if self.cfg.num_workers > 0:
            kw = dict(num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             collate_fn=partial(collate_joined, pad_id=self.pad_id), **kw)
        self._it = iter(loader)

    def next(self):
        n_batches = math.ceil(len(self.dataset) / self.cfg.batch_size)
        if self.batch_idx >= n_batches:
            self.epoch, self.batch_idx, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._open()
        item = next(self._it)
        self.batch_idx += 1
        return item


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _student_verbalizers(cfg: TrainConfig, adapter, progress: dict, out: Path):
    from vlsi.models.verbalizers import load_verbalizers

    if cfg.student_verbalizers:
        return load_verbalizers(cfg.student_verbalizers, adapter=adapter)
    vdir = out / "verbalizers"
    if "verbalize" in cfg.stages and "verbalize" not in progress["done"]:
        from vlsi.models.verbalize import VerbalizeConfig, run as run_verbalize

        layers = list(cfg.student_layers) if cfg.student_layers else None
        if layers is None and adapter.preset is None:
            raise VlsiError(f"{cfg.student}: no preset target layers for a local student; pass --student-layers")
        run_verbalize(VerbalizeConfig(
            model=cfg.student, data=cfg.data, out=str(vdir), image_root=cfg.image_root, layers=layers,
            kind=cfg.verbalizer_kind, steps=cfg.stage_steps("verbalize"),
            epochs=None if cfg.stage_steps("verbalize") is not None else cfg.epochs, batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay, seed=cfg.seed, resume=cfg.resume, max_length=cfg.max_length,
            on_bad_sample=cfg.on_bad_sample, save_every=cfg.save_every or 10**9, device=cfg.device,
            chunk_tokens=cfg.chunk_tokens, progress=cfg.progress))
        progress["done"].append("verbalize")
        _write_json(out / "progress.json", progress)
    if not (vdir / "verbalizers.json").is_file():
        raise VlsiError(f"{out}: the interact stage needs student verbalizers: run the verbalize stage "
                        "or pass --student-verbalizers VDIR")
    return load_verbalizers(vdir, adapter=adapter)


def _checkpoint_stage(ckpt_dir: Path) -> tuple[str, bool]:
    import torch

    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    return state["extra"].get("stage"), bool(state["extra"].get("stage_done"))


def _load_weights(ckpt_dir: Path, modules) -> None:
    from safetensors.torch import load_file

    from .lora import load_trainable_state

    load_trainable_state(load_file(str(ckpt_dir / "trainable.safetensors")), *modules)


def _read_progress(out: Path) -> dict:
    p = out / "progress.json"
    return json.loads(p.read_text()) if p.is_file() else {"done": []}


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    p = out / "config.yaml"
    if not (cfg.resume and p.is_file()):
        return
    import yaml

    old = yaml.safe_load(p.read_text()) or {}
    new = cfg.to_dict()
    diff = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if diff:
        raise VlsiError(f"{out}: --resume with different settings than the interrupted run: {', '.join(diff)}")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _memory(device) -> dict:
    import resource

    import torch

    m = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        m["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        m["gpu_alloc_mb"] = torch.cuda.memory_allocated(device) / 2**20
    return m


@contextlib.contextmanager
def _tensorboard(cfg: TrainConfig, out: Path):
    if not cfg.tensorboard:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VlsiError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    w = SummaryWriter(str(out / "tb"))
    try:
        yield w
    finally:
        w.close()
