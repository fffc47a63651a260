"""The one training loop. Every stage (verbalize, interact, sft, and any new one) runs through :class:`Engine`.

A stage (:class:`Stage`) supplies only what is its own:

- ``modules``: ``[(prefix, module)]`` whose parameters with ``requires_grad`` train (and are checkpointed);
- ``dataset``: a map-style dataset of ``(Encoded, targets or None)``, batched by ``collate_joined``;
- ``loss_step(batch, targets, n_norm, micro) -> (loss, StepMetrics)``: the loss of one micro-batch, already divided
  by ``n_norm`` (the answer rows of the whole step over every rank, so G micro-batches equal one batch of their
  union); ``micro`` is the micro-batch's global index, the key of any randomness it draws;
- optionally ``param_groups`` (optimizer groups with an ``lr_scale``) and ``log_fields`` (constant fields
  of every log record).

The engine owns the rest, once: AdamW + the LR schedule (cosine or linear, restarted per stage, as in the papers), accumulation,
gradient clipping, bf16 autocast on GPU, the JSONL log and progress bar with rates, checkpoints and exact resume
(weights, optimizer, scheduler, every RNG and the data position; :mod:`vlsi.train.checkpoint`, one format for any
world size), and data parallelism under torchrun (:mod:`vlsi.train.distributed`: one seeded order, rank-split steps,
global normalisation; rank 0 alone writes, save under FSDP where each rank writes its shards; results do not
depend on the number of ranks). A stage's modules may hold FSDP-sharded parameters (``--parallel fsdp``): FSDP
reduces their gradients in backward, the engine sums the replicated ones and clips over both.

Checkpoints of all stages share ``OUT/checkpoints``; their step numbers sort by (stage order, step). Starting a
stage: a checkpoint of the same stage that had not finished is resumed; a finished one means the stage is done; a
finished checkpoint of an earlier stage that trained the same parameters (interact -> sft) hands its weights on,
so a run restarted between stages continues from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from vlsi.common.config import Config, resume_diff
from vlsi.common.errors import VlsiError

__all__ = ["Engine", "Stage", "StepMetrics", "LoopSettings", "epoch_order", "lr_schedule", "prepare_out"]

from .names import STAGES as STAGE_ORDER  # the stages in the order they run; checkpoints sort by it


@dataclass
class StepMetrics:
    """What one micro-batch reports. ``sums``: numbers, lists or dicts of numbers already scaled so that their sum
    over the window is the window's value (e.g. ``kl * rows / n_norm``); ``draws``: values kept per micro-batch."""

    sums: dict = field(default_factory=dict)
    draws: dict = field(default_factory=dict)


class Stage:
    """Base of a training stage; subclasses set ``name``, ``modules``, ``dataset`` and define ``loss_step``."""

    name: str = ""
    modules: list = []
    dataset: Any = None

    def parameters(self) -> list:
        return [p for _, m in self.modules for p in m.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimizer groups: ``{"params": [...], "lr_scale": s}``; one group at the base LR by default."""
        return [{"params": self.parameters(), "lr_scale": 1.0}]

    def loss_step(self, batch, targets, n_norm: int, micro: int):
        """``(loss, StepMetrics)`` of one micro-batch; ``micro`` is its global index (key any randomness by it,
        so the run does not depend on the number of ranks)."""
        raise NotImplementedError

    def log_fields(self) -> dict:
        return {}

    def postfix(self, rec: dict) -> str:
        return ""


@dataclass
class LoopSettings:
    """The engine's plain settings (taken from a command's ``LoopOptions`` fields by :meth:`from_config`)."""

    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None
    seed: int
    save_every: int = 0
    keep_checkpoints: int = 2
    stop_after: int | None = None
    progress: bool = True
    num_workers: int = 0
    prefetch: int = 4
    tensorboard: bool = False
    schedule: str = "cosine"

    @classmethod
    def from_config(cls, cfg) -> "LoopSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})

    def total_steps(self, steps: int | None, epochs: float | None, n_samples: int, ranks: int = 1) -> int:
        """``steps``, else ``epochs`` (default 1) over ``n_samples`` in optimizer steps of ``ranks`` x
        ``grad_accum`` micro-batches each."""
        if steps is not None:
            return int(steps)
        per_step = self.grad_accum * ranks
        return max(1, math.ceil((epochs or 1.0) * math.ceil(n_samples / self.batch_size) / per_step))


def prepare_out(out: Path, cfg: Config, *, exclude: tuple[str, ...] = (), write: bool = True,
                world_size: int = 1) -> None:
    """Refuse an existing run without ``--resume`` and a resume whose resume-critical fields changed (naming them),
    or whose global batch (ranks x --batch-size x --grad-accum) changed; then write the effective config to
    ``OUT/config.yaml`` and the global batch to ``OUT/run.json`` (``write``: rank 0 only)."""
    ckpts = out / "checkpoints" / "latest"
    saved, run_file = out / "config.yaml", out / "run.json"
    global_batch = world_size * cfg.batch_size * cfg.grad_accum
    if ckpts.exists() and not cfg.resume:
        raise VlsiError(f"{out}: holds a previous run (checkpoints/); pass --resume or use a new --out")
    if cfg.resume and saved.is_file():
        import yaml

        diff = resume_diff(yaml.safe_load(saved.read_text()) or {}, cfg)
        old = json.loads(run_file.read_text()).get("global_batch") if run_file.is_file() else None
        if old is not None and old != global_batch:
            diff.append(f"global batch = ranks x --batch-size x --grad-accum ({old} -> {global_batch})")
        if diff:
            raise VlsiError(f"{out}: --resume with different settings than the interrupted run: {', '.join(diff)}")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(saved, exclude=exclude)
        tmp = run_file.with_name(run_file.name + ".tmp")
        tmp.write_text(json.dumps({"global_batch": global_batch, "world_size": world_size}) + "\n")
        tmp.replace(run_file)


class Engine:
    """Runs stages in order over one output folder (log, checkpoints). See the module doc."""

    def __init__(self, out: str | Path, settings: LoopSettings, *, device, pad_id: int, bad_samples=None,
                 world=None):
        from .distributed import World

        self.world = world or World()  # data-parallel ranks (vlsi.train.distributed); rank 0 alone writes
        self.out = Path(out)
        self.s = settings
        self.device = device
        self.pad_id = pad_id
        self.bad_samples = bad_samples  # a BadSamplePolicy: samples rejected at load time go through it
        self.ckpt_root = self.out / "checkpoints"
        self.log_path = self.out / "metrics.jsonl"

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def _latest(self):
        from .checkpoint import checkpoint_stage, latest_checkpoint

        latest = latest_checkpoint(self.ckpt_root) if self.ckpt_root.exists() else None
        return (latest, *checkpoint_stage(latest)) if latest is not None else (None, None, False)

    def stage_done(self, name: str) -> bool:
        """True when the latest checkpoint is of ``name`` finished, or of a later stage."""
        _, stage, done = self._latest()
        if stage is None:
            return False
        order = STAGE_ORDER.index
        return order(stage) > order(name) or (stage == name and done)

    def restore(self, modules) -> bool:
        """Load the latest checkpoint's weights into ``modules`` when it holds exactly their trainable parameters
        (a finished earlier stage that trained the same set: interact -> sft); True when loaded. Every rank."""
        from .checkpoint import load_weights

        latest, _, _ = self._latest()
        return latest is not None and load_weights(latest, modules)

    def _rejected(self, r) -> None:
        """A sample the dataset refused at load time: fatal errors stop the run, bad samples go to the policy
        (reported once in OUT/bad_samples.jsonl, however many epochs meet them)."""
        if r.fatal or self.bad_samples is None:
            raise r.error
        n = self.bad_samples.report.count
        self.bad_samples.handle(r.error)  # raises in error mode
        if self.bad_samples.report.count > n and self.world.main:
            self.bad_samples.report.write(self.out / "bad_samples.jsonl")

    # ---- one stage -----------------------------------------------------------------------------------------------
    def run(self, stage: Stage, total_steps: int) -> dict:
        """Train ``stage`` for ``total_steps`` optimizer steps (or resume it); returns its summary."""
        import torch

        from .checkpoint import load_checkpoint, save_checkpoint
        from .distributed import is_sharded

        s = self.s
        params = stage.parameters()
        if not params:
            raise VlsiError(f"stage {stage.name}: nothing to train")
        groups = [{"params": g["params"], "lr": s.lr * g.get("lr_scale", 1.0)} for g in stage.param_groups()
                  if g["params"]]
        sharded = [is_sharded(p) for p in params]  # --parallel fsdp: DTensor shards (replicated head, verbalizers)
        mixed = any(sharded) and not all(sharded)  # foreach kernels take DTensors or tensors, not both in one list
        opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay, foreach=False if mixed else None)
        sched = lr_schedule(opt, kind=s.schedule, total_steps=total_steps, warmup_steps=s.warmup_steps,
                            min_ratio=s.min_lr / s.lr)
        step, micro = 0, 0  # micro: global index of the next window's first micro-batch (over all epochs)
        latest, ck_stage, ck_done = self._latest()
        n_batches = math.ceil(len(stage.dataset) / s.batch_size)
        if latest is not None and ck_stage == stage.name and not ck_done:
            state = load_checkpoint(latest, modules=stage.modules, optimizer=opt, scheduler=sched)  # every rank
            pos = state["position"]
            step, micro = state["extra"]["stage_step"], pos.get("micro", pos["epoch"] * n_batches + pos["batch"])
        elif ck_done:
            self.restore(stage.modules)

        w = self.world
        on_gpu = self.device.type == "cuda"
        autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext
        stream = _BatchStream(stage.dataset, s, self.pad_id, micro + w.rank, w.size)
        meter = _Meter()
        bar = None
        if s.progress and w.main:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True)
        if on_gpu:  # every GPU: a frozen model spread by a device_map trains verbalizers on several
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        steps_this_run, first, last, empty = 0, None, {}, 0
        per_step = w.size * s.grad_accum  # global micro-batches per optimizer step
        with _JsonlLog(self.log_path, enabled=w.main) as log, _tensorboard(s.tensorboard and w.main, self.out) as tb:
            try:
                while step < total_steps:
                    t0 = time.perf_counter()
                    err = window = None
                    try:  # this rank's share of the step: global micro-batches micro + rank + world * k
                        window = [stream.get() for _ in range(s.grad_accum)]
                    except Exception as e:  # noqa: BLE001 - every rank learns of it in check()
                        err = e
                    w.check(err)
                    rejected = sorted((r for part in w.gather([(g, r) for g, _, _, rs in window for r in rs])
                                       for r in part), key=lambda x: x[0])
                    for _, r in rejected:  # in global order, on every rank: error mode stops them all alike
                        self._rejected(r)
                    counts = w.sum([sum(b.num_answer_rows for _, b, _, _ in window if b is not None),
                                    sum(len(b) for _, b, _, _ in window if b is not None),
                                    sum(b.num_tokens for _, b, _, _ in window if b is not None)])
                    n_norm, n_samples, n_tokens = (int(c) for c in counts)  # the step's global counts
                    micro += per_step
                    if n_norm == 0:  # every micro-batch of the step was rejected: no step
                        empty += 1
                        if empty > n_batches:
                            raise VlsiError("every sample of the dataset was rejected (see bad_samples.jsonl)")
                        continue
                    empty = 0
                    opt.zero_grad(set_to_none=True)
                    loss_sum, sums, draws = 0.0, {}, []
                    try:
                        for g, batch, targets, _ in window:
                            if batch is None:  # emptied by rejections: contributes nothing to the step
                                continue
                            with autocast():
                                loss, m = stage.loss_step(batch, targets, n_norm, g)
                            loss.backward()
                            loss_sum += float(loss.detach())
                            sums = _add(sums, m.sums)
                            if m.draws:
                                draws.append((g, m.draws))
                    except Exception as e:  # noqa: BLE001
                        err = e
                    w.check(err)
                    w.sum_grads(params)  # the replicated ones: FSDP has reduced its shards' in backward
                    grad_norm = None
                    if s.max_grad_norm:
                        grad_norm = w.clip_grad_norm(params, s.max_grad_norm)
                    lr = sched.get_last_lr()[0]
                    opt.step()
                    sched.step()
                    step += 1
                    steps_this_run += 1
                    loss_sum, sums = _world_sum(w, loss_sum, sums)
                    merged: dict = {}
                    for _, d in sorted((x for part in w.gather(draws) for x in part), key=lambda x: x[0]):
                        for k, v in d.items():
                            merged.setdefault(k, []).append(v)
                    meter.update(n_samples, n_tokens)
                    dt = time.perf_counter() - t0
                    rec = {"stage": stage.name, "step": step, "epoch": (micro - per_step) // max(1, n_batches),
                           "lr": lr, "loss": loss_sum, "grad_norm": grad_norm, **sums, **merged,
                           **stage.log_fields(), "samples": n_samples, "tokens": n_tokens, "answer_tokens": n_norm,
                           "step_s": dt, "tokens_per_s": n_tokens / dt, "answer_tokens_per_s": n_norm / dt,
                           "samples_per_s": meter.rates()["samples_per_s"], "memory": _memory(self.device)}
                    log.log(rec)
                    first = first or rec
                    last = rec
                    if tb is not None:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                tb.add_scalar(f"{stage.name}/{k}", v, step)
                    if bar is not None:
                        bar.update(1)
                        extra = stage.postfix(rec)
                        bar.set_postfix_str(f"loss {loss_sum:.4f}{' | ' + extra if extra else ''} | "
                                            f"{rec['samples_per_s']:.1f} samp/s {rec['tokens_per_s']:.0f} tok/s")
                    done = step >= total_steps
                    stopping = s.stop_after is not None and steps_this_run >= s.stop_after
                    if done or stopping or (s.save_every and step % s.save_every == 0):  # every rank: shards
                        save_checkpoint(self.ckpt_root, STAGE_ORDER.index(stage.name) * 10_000_000 + step,
                                        modules=stage.modules, optimizer=opt, scheduler=sched,
                                        position={"micro": micro, "epoch": micro // max(1, n_batches),
                                                  "batch": micro % max(1, n_batches)},
                                        extra={"stage": stage.name, "stage_step": step, "stage_done": done},
                                        keep=s.keep_checkpoints, world=w)
                    if stopping and not done:
                        break
            finally:
                if bar is not None:
                    bar.close()
        w.barrier()  # rank 0's checkpoint is complete before any rank moves on
        return {"step": step, "total_steps": total_steps, "finished": step >= total_steps,
                "last_loss": last.get("loss"), "first": first, "last": last, **meter.rates()}


def _add(acc, new):
    """Window sum of micro-batch metrics: numbers add, lists add elementwise, dicts add per key."""
    if isinstance(new, dict):
        acc = dict(acc) if isinstance(acc, dict) else {}
        for k, v in new.items():
            acc[k] = _add(acc.get(k), v)
        return acc
    if isinstance(new, list):
        return [_add(a, b) for a, b in zip(acc, new)] if isinstance(acc, list) else list(new)
    if new is None:
        return acc
    return new if acc is None else acc + new


def _world_sum(w, loss: float, sums):
    """The step's metrics summed over ranks (``sums``' numbers, lists and dicts keep their shape)."""
    if w.size == 1:
        return loss, sums
    flat: list = []

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k])
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif x is not None:
            flat.append(float(x))

    walk(sums)
    total = iter(w.sum([loss] + flat))
    loss = next(total)

    def rebuild(x):
        if isinstance(x, dict):
            return {k: rebuild(x[k]) for k in sorted(x)}
        if isinstance(x, list):
            return [rebuild(v) for v in x]
        return None if x is None else next(total)

    return loss, rebuild(sums)


class _Batches:
    """The batch sampler of one epoch: slices ``b, b + stride, ...`` of the seeded permutation, made as they are
    asked for (no list of every batch: memory stays flat in the number of samples)."""

    def __init__(self, order, batch_size: int, start: int, stride: int):
        self.order, self.bs, self.start, self.stride = order, batch_size, start, stride

    def __len__(self) -> int:
        return len(range(self.start, math.ceil(len(self.order) / self.bs), self.stride))

    def __iter__(self):
        for b in range(self.start, math.ceil(len(self.order) / self.bs), self.stride):
            yield self.order[b * self.bs:(b + 1) * self.bs].tolist()


class _BatchStream:
    """This rank's micro-batches: global micro-batch indices ``first, first + world, ...`` over consecutive epochs
    (micro-batch ``g`` is batch ``g mod n`` of epoch ``g // n`` of the seeded order), read ahead by a DataLoader.
    ``get()`` returns ``(g, batch or None, targets, rejected)``: rejected samples are dropped from their batch."""

    def __init__(self, dataset, s: LoopSettings, pad_id: int, first: int, stride: int):
        self.dataset, self.s, self.pad_id, self.stride = dataset, s, pad_id, stride
        self.n_batches = max(1, math.ceil(len(dataset) / s.batch_size))
        self.next_micro = first
        self._it, self._expect = None, None

    def _open(self, epoch: int, b: int):
        import torch

        from .join import collate_joined

        order = epoch_order(len(self.dataset), seed=self.s.seed, epoch=epoch)
        kw = dict(num_workers=self.s.num_workers, prefetch_factor=self.s.prefetch) if self.s.num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_Batches(order, self.s.batch_size, b,
                                                                                  self.stride),
                                             collate_fn=partial(collate_joined, pad_id=self.pad_id), **kw)
        self._it = iter(loader)

    def get(self):
        g = self.next_micro
        pos = divmod(g, self.n_batches)
        if self._expect != pos:
            self._open(*pos)
        batch, targets, rejected = next(self._it)
        self.next_micro = g + self.stride
        e, b = pos
        self._expect = (e, b + self.stride) if b + self.stride < self.n_batches else None
        return g, batch, targets, rejected


def lr_schedule(optimizer, *, kind: str = "cosine", total_steps: int, warmup_steps: int = 0,
                min_ratio: float = 0.0):
    """``LambdaLR``: linear warmup over ``warmup_steps``, then ``kind`` (``cosine`` | ``linear``; ``auto`` reads
    as cosine) from each group's LR down to ``min_ratio`` times it at the last step (--min-lr / --lr: every group
    keeps its scale)."""
    import torch

    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if kind not in ("auto", "cosine", "linear"):
        raise ValueError(f"unknown schedule {kind!r}")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def epoch_order(n: int, *, seed: int, epoch: int):
    """Sample order of ``epoch`` (int64 array): a permutation from a generator seeded by (seed, epoch) only, so a
    run resumes at (epoch, batch) without storing it."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


class _JsonlLog:
    """Append-only JSONL log: one record per line, flushed, next to the human progress bar (opened at the first
    record: a run refused before its first step leaves no log)."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path, self._f, self.enabled = path, None, enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        self._f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()


class _Meter:
    """Throughput since start: samples/s and tokens/s (wall clock)."""

    def __init__(self):
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict:
        dt = max(1e-9, time.perf_counter() - self.t0)
        return {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt}


def _memory(device) -> dict:
    """CPU peak RSS, and on GPU the peak / current allocation: ``gpu_peak_mb`` is the largest peak of any GPU
    (the one that runs out first when a device_map spreads the model), ``gpu_alloc_mb`` the total over GPUs, and
    ``gpu_peak_mb_per_device`` lists each GPU's peak when there are several."""
    import resource

    import torch

    m = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peaks = [torch.cuda.max_memory_allocated(d) / 2**20 for d in range(torch.cuda.device_count())]
        m["gpu_peak_mb"] = max(peaks)
        m["gpu_alloc_mb"] = sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
        if len(peaks) > 1:
            m["gpu_peak_mb_per_device"] = peaks
    return m


@contextlib.contextmanager
def _tensorboard(enabled: bool, out: Path):
    if not enabled:
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
