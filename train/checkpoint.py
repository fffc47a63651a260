"""Checkpoints of the training engine (:mod:`vlsi.train.engine`) and the RNG state they hold.

- ``seed_everything`` / ``rng_state`` / ``set_rng_state``: every RNG a run touches (python, torch CPU, CUDA).
- ``save_checkpoint`` / ``load_checkpoint`` / ``load_weights``: one format for every world size and parallel mode.

A checkpoint ``step_<N>/`` holds:

- ``dcp/``: the trainable weights (``model.<prefix>.<name>``) and the optimizer state keyed by parameter name
  (``optim.*``, :func:`torch.distributed.checkpoint.state_dict.get_state_dict`), written by
  ``torch.distributed.checkpoint`` (DCP). Sharded weights (``--parallel fsdp``) are written by every rank, each its
  shards, in one collective save; replicated ones (one process, ``--parallel ddp``) by rank 0 alone. Either loads
  on any world size and mode: DCP reads what each rank's parameters cover (a shard, or the whole tensor);
- ``state.pt`` (rank 0, ``torch.save``, loaded with ``weights_only=True``): scheduler, RNG, data position, step;
- ``meta.json`` (rank 0): format, step, position and the stage's ``extra``, what start-up reads.

A checkpoint becomes the resume point only when the ``latest`` pointer is rewritten (rank 0, last, after every
rank's shards are written), so an interrupted save is never resumed from. Checkpoints of the previous format
(``trainable.safetensors`` + the optimizer in ``state.pt``, one process only) are refused, naming the file: they
were resume points of interrupted runs, not results (``ODIR/final`` and the verbalizers are unchanged).
"""
import contextlib
import json
import random
import shutil
import warnings
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


FORMAT = 2  # meta.json "format": 2 = DCP weights + optimizer; absent = the single-file format before it


def save_checkpoint(ckpt_root: str | Path, step: int, *, modules, optimizer, scheduler, position: dict,
                    extra: dict | None = None, keep: int = 2, world=None) -> Path | None:
    """Write ``ckpt_root/step_<step>/`` then point ``ckpt_root/latest`` at it; keep the newest ``keep``.

    Every rank calls it. ``modules``: the stage's ``[(prefix, module)]`` (their parameters that require grad are
    saved). With sharded parameters it is a collective (each rank writes its shards); otherwise only rank 0 does
    anything. Returns the directory on rank 0, None elsewhere."""
    import torch.distributed.checkpoint as dcp

    from .distributed import World

    world = world or World()
    sharded = _sharded(modules)
    if not (sharded or world.main):
        return None
    root = Path(ckpt_root)
    d, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if world.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    state = _state_dict(modules, optimizer)
    if sharded:
        world.barrier()  # the fresh tmp folder exists before any rank writes into it
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))  # returns on rank 0 once every rank's shards are written
    else:
        with _one_process():
            dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    if not world.main:
        return None
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "position": position,
                "extra": extra or {}}, tmp / "state.pt")
    # what a run asks of its latest checkpoint at start-up, without loading the optimizer state (GBs when full)
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, "position": position,
                                               "extra": extra or {}, "sharded": sharded,
                                               "world_size": world.size}))
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
    """The committed checkpoint ``latest`` points at (None without one); refuses an incomplete one and one of
    another format, naming the file."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    d = root / pointer.read_text().strip()
    meta = d / "meta.json"
    try:
        fmt = json.loads(meta.read_text()).get("format") if meta.is_file() else None
    except (OSError, ValueError) as e:
        raise VlsiError(f"{meta}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if fmt is None and (d / "trainable.safetensors").is_file():
        raise VlsiError(f"{d / 'trainable.safetensors'}: a checkpoint of the single-file format that came before "
                        f"format {FORMAT} (torch.distributed.checkpoint); this version cannot resume it: use a new "
                        "--out")
    if fmt is not None and fmt != FORMAT:
        raise VlsiError(f"{meta}: checkpoint format {fmt}; this version reads format {FORMAT}")
    if fmt is None or not (d / "state.pt").is_file() or not (d / "dcp" / ".metadata").is_file():
        raise VlsiError(f"{pointer}: points at {d.name}, which is incomplete; delete it to restart")
    return d


def load_checkpoint(ckpt_dir: str | Path, *, modules, optimizer, scheduler) -> dict:
    """Restore the trainable weights of ``modules``, the optimizer, scheduler and RNG from ``ckpt_dir`` on any
    world size (a collective when the parameters are sharded); returns the ``state.pt`` dict (position, extra)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    d = Path(ckpt_dir)
    try:
        meta = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise VlsiError(f"{d / 'state.pt'}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    _check_keys(d, modules)
    state = _state_dict(modules, optimizer)  # also creates the optimizer state DCP loads into
    with _one_process():
        dcp.load(state, checkpoint_id=str(d / "dcp"), no_dist=not _sharded(modules))
    set_state_dict(_Modules(modules), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_opts())
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"])
    return meta


def load_weights(ckpt_dir: str | Path, modules) -> bool:
    """Load the trainable weights of ``modules`` from ``ckpt_dir`` when it holds exactly their names (a finished
    earlier stage that trained the same set: interact -> sft); True when loaded. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if set(checkpoint_keys(ckpt_dir)) != set(trainable_state(*modules)):
        return False
    container = _Modules(modules)
    weights = get_model_state_dict(container, options=_opts())
    with _one_process():
        dcp.load({"model": weights}, checkpoint_id=str(Path(ckpt_dir) / "dcp"), no_dist=not _sharded(modules))
    set_model_state_dict(container, weights, options=_opts())
    return True


def checkpoint_keys(ckpt_dir: str | Path) -> list[str]:
    """The names of the trainable weights a checkpoint holds (``prefix.name``), from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(Path(ckpt_dir) / "dcp")).read_metadata()
    return [k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")]


def read_trainable(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint as whole CPU tensors, in one process, whatever world size wrote it
    (for tests and tools)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = str(Path(ckpt_dir) / "dcp")
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    out = {k: torch.empty(md[f"model.{k}"].size, dtype=md[f"model.{k}"].properties.dtype)
           for k in checkpoint_keys(ckpt_dir)}
    with _one_process():
        dcp.load({"model": out}, checkpoint_id=path, no_dist=True)
    return out


def checkpoint_stage(ckpt_dir: Path) -> tuple[str | None, bool]:
    """(stage name, whether that stage had finished) of a checkpoint, from its small ``meta.json``."""
    extra = json.loads((Path(ckpt_dir) / "meta.json").read_text())["extra"]
    return extra.get("stage"), bool(extra.get("stage_done"))


class _Modules(nn.Module):
    """The stage's ``[(prefix, module)]`` as one module (``prefix.name`` parameter names), for DCP's state-dict
    helpers; the modules themselves are not changed."""

    def __init__(self, modules):
        super().__init__()
        for prefix, m in modules:
            self.add_module(prefix, m)


def _opts():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # trainable parameters only (a LoRA run saves its adapters); not strict, since the frozen ones are not loaded
    # either: _check_keys has compared the trainable names with the checkpoint's first
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state_dict(modules, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(_Modules(modules), optimizer, options=_opts())
    return {"model": model, "optim": optim}


@contextlib.contextmanager
def _one_process():
    """DCP without its warning that no process group is used: replicated state is saved (and any state may be
    read) by one process on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _sharded(modules) -> bool:
    from .distributed import is_sharded

    return any(is_sharded(p) for _, m in modules for p in m.parameters() if p.requires_grad)


def _check_keys(d: Path, modules) -> None:
    """Refuse a checkpoint whose weights are not the trainable parameters of ``modules``, naming some."""
    have, want = set(checkpoint_keys(d)), set(trainable_state(*modules))
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise VlsiError(f"{d}: checkpoint does not fit the trainable parameters (missing {missing[:3]}, "
                        f"extra {extra[:3]})")


def trainable_state(*modules_by_prefix: tuple[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{prefix.name: tensor}`` of every parameter that requires grad (what a checkpoint must hold)."""
    out = {}
    for prefix, mod in modules_by_prefix:
        for name, p in mod.named_parameters():
            if p.requires_grad:
                out[f"{prefix}.{name}"] = p.detach()
    return out
