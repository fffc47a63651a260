"""Training utilities shared by the verbalization step and the student trainer.

- ``seed_everything`` / ``rng_state`` / ``set_rng_state``: every RNG a run touches (python, torch CPU, CUDA).
- ``cosine_schedule``: linear warmup then cosine from the base LR down to ``min_lr`` (paper: 1e-4 -> 1e-6).
- ``epoch_order``: the deterministic sample order of an epoch (a function of seed and epoch only), so a run can
  resume at (epoch, batch) without storing the permutation.
- ``save_checkpoint`` / ``load_checkpoint``: trainable weights (safetensors) + optimizer, scheduler, RNG and data
  position (``torch.save``, loaded with ``weights_only=True``); a checkpoint becomes the resume point only when the
  ``latest`` pointer is rewritten, last, so an interrupted save is never resumed from.
- ``JsonlLogger``: one JSON object per line, flushed per record. ``Meter``: samples/s and tokens/s over a window.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vlsi.models.errors import VlsiError

LATEST = "latest"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": _py_state_to_json(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_py_state_from_json(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_json(s) -> list:
    # (version, tuple of 625 ints, gauss_next): lists of ints load under torch.load(weights_only=True).
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def cosine_schedule(optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
    """``LambdaLR``: linear warmup over ``warmup_steps``, then cosine from each group's LR to ``min_lr``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    bases = [g["lr"] for g in optimizer.param_groups]

    def factor_for(base):
        floor = min_lr / base if base > 0 else 0.0

        def f(step: int) -> float:
            if warmup_steps and step < warmup_steps:
                return (step + 1) / warmup_steps
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(b) for b in bases])


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Sample order of ``epoch``: a permutation from a generator seeded by (seed, epoch) only."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def save_checkpoint(ckpt_root: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    scheduler, position: dict, extra: dict | None = None, keep: int = 2) -> Path:
    """Write ``ckpt_root/step_<step>/`` then point ``ckpt_root/latest`` at it; keep the newest ``keep``."""
    from safetensors.torch import save_file

    root = Path(ckpt_root)
    d = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "rng": rng_state(), "position": position, "extra": extra or {}},
        tmp / "state.pt",
    )
    if d.exists():
        shutil.rmtree(d)
    tmp.replace(d)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(d.name + "\n")
    pointer.replace(root / LATEST)  # the commit point
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != d)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return d


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    d = root / pointer.read_text().strip()
    if not (d / "state.pt").is_file():
        raise VlsiError(f"{pointer}: points at {d.name}, which is incomplete; delete it to restart")
    return d


def load_checkpoint(ckpt_dir: str | Path, *, optimizer, scheduler, map_location="cpu") -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG from ``ckpt_dir``; returns ``(trainable_state, state)``."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    try:
        state = torch.load(d / "state.pt", map_location=map_location, weights_only=True)
    except Exception as e:
        raise VlsiError(f"{d / 'state.pt'}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    trainable = load_file(str(d / "trainable.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return trainable, state


class JsonlLogger:
    """Append-only JSONL log (one record per line, flushed) next to the human progress bar."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Meter:
    """Throughput since start: samples/s and tokens/s (wall clock)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    @property
    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.t0)

    def rates(self) -> dict:
        return {"samples_per_s": self.samples / self.elapsed, "tokens_per_s": self.tokens / self.elapsed}
