"""Checkpoints of the training engine (:mod:`vlsi.train.engine`) and the RNG state they hold.

- ``seed_everything`` / ``rng_state`` / ``set_rng_state``: every RNG a run touches (python, torch CPU, CUDA).
- ``save_checkpoint`` / ``load_checkpoint``: trainable weights (safetensors) + optimizer, scheduler, RNG and data
  position (``torch.save``, loaded with ``weights_only=True``); a checkpoint becomes the resume point only when the
  ``latest`` pointer is rewritten, last, so an interrupted save is never resumed from.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from torch import nn

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
    # what a run asks of its latest checkpoint at start-up, without loading the optimizer state (GBs when full)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "position": position, "extra": extra or {}}))
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


def checkpoint_stage(ckpt_dir: Path) -> tuple[str | None, bool]:
    """(stage name, whether that stage had finished) of a checkpoint, from its small ``meta.json``."""
    meta = Path(ckpt_dir) / "meta.json"
    if meta.is_file():
        extra = json.loads(meta.read_text())["extra"]
    else:  # written before meta.json existed
        extra = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)["extra"]
    return extra.get("stage"), bool(extra.get("stage_done"))


def trainable_state(*modules_by_prefix: tuple[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{prefix.name: tensor}`` of every parameter that requires grad (what a checkpoint must hold)."""
    out = {}
    for prefix, mod in modules_by_prefix:
        for name, p in mod.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = p.detach()
    return out


def load_trainable_state(state: dict[str, torch.Tensor], *modules_by_prefix: tuple[str, nn.Module]) -> None:
    """Copy a :func:`trainable_state` dict back into the same modules; refuses missing or extra keys."""
    params = {}
    for prefix, mod in modules_by_prefix:
        for name, p in mod.named_parameters():
            if p.requires_grad:
                params[f"{prefix}.{name}"] = p
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise VlsiError(f"checkpoint does not fit the trainable parameters (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.device, p.dtype))
