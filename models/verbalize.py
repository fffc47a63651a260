"""The VLsI verbalization step (METHOD.md "Step 1"), one loop read top to bottom.

Backbone frozen and run under ``no_grad``; only the verbalizers train. Loss per optimizer step:
``sum over target layers of CE(lm_head(final_norm(verbalizer_l(h_l))), next token)`` averaged over the step's
answer tokens (the global count over all ``grad_accum`` micro-batches, so accumulation does not change the loss).
AdamW + cosine schedule (optional warmup), bf16 autocast on GPU, JSONL log, checkpoints, exact resume
(weights + optimizer + scheduler + RNG + data position (epoch, batch)).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlsi.models.errors import VlsiError


@dataclass
class VerbalizeConfig:
    model: str
    """Local model dir, preset name or cached hub id."""
    data: str
    """LLaVA-style .json/.jsonl or .parquet."""
    out: str
    """Output dir: verbalizers.safetensors + verbalizers.json, log.jsonl, checkpoints/."""
    image_root: str | None = None
    layers: list[int] | None = None
    """Target layers; default: the preset's."""
    kind: str = "verb-ffn"
    steps: int | None = None
    """Optimizer steps (exclusive with ``epochs``; default 1 epoch)."""
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    resume: bool = False
    max_length: int | None = None
    on_bad_sample: str = "error"
    save_every: int = 100
    """Checkpoint every N optimizer steps (and at the end)."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many steps of this run: time-sliced jobs / preemption tests."""
    device: str | None = None
    chunk_tokens: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise VlsiError("pass --steps or --epochs, not both")
        for name in ("batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise VlsiError(f"--{name.replace('_', '-')} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise VlsiError("--steps must be >= 1")
        if self.on_bad_sample not in ("error", "skip"):
            raise VlsiError(f"--on-bad-sample must be error or skip, got {self.on_bad_sample!r}")


def run(cfg: VerbalizeConfig) -> dict:
    """Train verbalizers per ``cfg``; returns a JSON-able summary."""
    import torch

    from vlsi.models.adapter import load_model
    from vlsi.models.data import BadSamplePolicy, BadSampleReport, read_dataset
    from vlsi.models.encoding import collate, encode_sample
    from vlsi.models.trainutil import (JsonlLogger, Meter, cosine_schedule, epoch_order, latest_checkpoint,
                                       load_checkpoint, save_checkpoint, seed_everything)
    from vlsi.models.verbalizers import VerbalizerSet

    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if resume_from is not None and not cfg.resume:
        raise VlsiError(f"{out}: holds a checkpoint ({resume_from.name}); pass --resume or use a new --out")
    seed_everything(cfg.seed)

    adapter = load_model(cfg.model, device=cfg.device)
    layers = cfg.layers or (list(adapter.preset.target_layers) if adapter.preset else None)
    if not layers:
        raise VlsiError(f"{cfg.model}: no preset target layers for a local model; pass --layers (e.g. 2,6,10)")
    vs = VerbalizerSet.for_model(adapter, layers, kind=cfg.kind)
    vs.float().train()  # fp32 master weights; autocast handles bf16 compute on GPU

    report = BadSampleReport()
    policy = BadSamplePolicy(cfg.on_bad_sample, report)
    samples = list(read_dataset(cfg.data, image_root=cfg.image_root, on_bad_sample=policy))
    if not samples:
        raise VlsiError(f"{cfg.data}: no usable samples")
    n_batches = math.ceil(len(samples) / cfg.batch_size)
    if cfg.steps is not None:
        total_steps = cfg.steps
    else:
        total_steps = max(1, math.ceil((cfg.epochs or 1.0) * n_batches / cfg.grad_accum))

    params = [p for p in vs.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, total_steps=total_steps, warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr)
    step, epoch, batch_idx = 0, 0, 0
    if resume_from is not None:
        trainable, state = load_checkpoint(resume_from, optimizer=opt, scheduler=sched)
        vs.blocks.load_state_dict(trainable)
        step, epoch, batch_idx = state["step"], state["position"]["epoch"], state["position"]["batch"]
        if state["extra"].get("config_key") != _config_key(cfg, layers):
            raise VlsiError(f"{resume_from}: checkpoint was written with different training settings; "
                            "resume with the same flags or use a new --out")

    on_gpu = adapter.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    pad_id = adapter.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = adapter.tokenizer.eos_token_id
    skipped_ids: set = set(report.ids)
    order = epoch_order(len(samples), seed=cfg.seed, epoch=epoch)

    def next_batch():
        """The next non-empty encoded batch in (epoch, batch) order; advances the data position."""
        nonlocal epoch, batch_idx, order
        while True:
            if batch_idx >= n_batches:
                epoch, batch_idx = epoch + 1, 0
                order = epoch_order(len(samples), seed=cfg.seed, epoch=epoch)
            idx = order[batch_idx * cfg.batch_size:(batch_idx + 1) * cfg.batch_size]
            batch_idx += 1
            encs = []
            for i in idx:
                s = samples[i]
                if s.id in skipped_ids:
                    continue
                e = encode_sample(s, adapter, max_length=cfg.max_length, policy=policy)
                if e is None:
                    skipped_ids.add(s.id)  # recorded once, skipped in every later epoch
                else:
                    encs.append(e)
            if encs:
                return collate(encs, pad_id)
            if len(skipped_ids) >= len(samples):
                raise VlsiError(f"{cfg.data}: every sample was skipped as bad (see the report)")

    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLogger(out / "log.jsonl")
    meter = Meter()
    first_losses: dict | None = None
    last: dict = {}
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="verbalize", unit="step", dynamic_ncols=True)
    steps_this_run = 0
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [next_batch() for _ in range(cfg.grad_accum)]
            n_rows = sum(b.num_answer_rows for b in micro)  # global count: accumulation-invariant mean
            layer_sum = {i: 0.0 for i in layers}
            opt.zero_grad(set_to_none=True)
            for b in micro:
                with autocast:
                    loss, sums = verbalization_loss(vs, adapter, b, chunk_tokens=cfg.chunk_tokens)
                for i in layers:
                    layer_sum[i] += sums[i]
                (loss / n_rows).backward()
            opt.step()
            sched.step()
            step += 1
            steps_this_run += 1
            n_samples = sum(len(b) for b in micro)
            n_tokens = sum(b.num_tokens for b in micro)
            meter.update(n_samples, n_tokens)
            per_layer = {str(i): layer_sum[i] / n_rows for i in layers}
            if first_losses is None:
                first_losses = per_layer
            last = per_layer
            rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": sum(per_layer.values()),
                   "loss_per_layer": per_layer, "samples": n_samples, "tokens": n_tokens, "answer_tokens": n_rows,
                   "step_s": time.perf_counter() - t0, **meter.rates()}
            log.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {rec['loss']:.3f} | " + " ".join(f"L{k}:{v:.2f}" for k, v in per_layer.items())
                    + f" | {rec['samples_per_s']:.1f} samp/s {rec['tokens_per_s']:.0f} tok/s"
                )
            done = step >= total_steps
            stopping = cfg.stop_after is not None and steps_this_run >= cfg.stop_after
            if done or stopping or step % cfg.save_every == 0:
                save_checkpoint(ckpt_root, step, trainable=vs.blocks.state_dict(), optimizer=opt, scheduler=sched,
                                position={"epoch": epoch, "batch": batch_idx},
                                extra={"config_key": _config_key(cfg, layers)})
            if stopping and not done:
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()

    summary = {
        "out": str(out),
        "model": adapter.name,
        "kind": cfg.kind,
        "layers": layers,
        "step": step,
        "total_steps": total_steps,
        "finished": step >= total_steps,
        "samples": len(samples),
        "skipped": report.count,
        "first_loss_per_layer": first_losses,
        "last_loss_per_layer": last,
        **meter.rates(),
    }
    if step >= total_steps:
        summary["verbalizer_sha256"] = vs.save(out, adapter.fingerprint())
    if report.count:
        summary["bad_sample_report"] = str(report.write(out / "bad_samples.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def verbalization_loss(vs, adapter, batch, *, chunk_tokens: int | None = None):
    """Summed (not averaged) verbalization loss of one batch: ``sum_l sum_rows CE_l`` and its per-layer parts.

    The backbone runs under ``no_grad``; gradients reach only the verbalizers (the head and final norm are frozen
    and shared). CE is over the real vocab, chunked over tokens (``vlsi.ops.ce_from_hidden``): no [rows x vocab]
    logits for all layers at once. Returns ``(loss tensor, {layer: float sum})``; divide by the answer-token count.
    """
    from vlsi.models.verbalizers import verbalized_states
    from vlsi.ops import ce_from_hidden

    head_w = adapter.lm_head.weight.detach()
    head_b = getattr(adapter.lm_head, "bias", None)
    head_b = head_b.detach() if head_b is not None else None
    targets = batch.answer_targets.to(adapter.device)
    states, _ = verbalized_states(vs, adapter, batch)
    loss, sums = 0.0, {}
    for i in vs.layers:
        ce = ce_from_hidden(states[i], head_w, targets, real_vocab=adapter.vocab_size, head_bias=head_b,
                            chunk_tokens=chunk_tokens)
        s_i = ce.sum()
        sums[i] = float(s_i.detach())
        loss = loss + s_i
    return loss, sums


def _config_key(cfg: VerbalizeConfig, layers) -> dict:
    # Settings that must not change across a resume (they change the data order or the optimisation).
    d = asdict(cfg)
    keep = ("kind", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "seed", "steps",
            "epochs", "max_length")
    return {k: d[k] for k in keep} | {"layers": list(layers)}
