"""The recipes: ``vlsi-train`` (:func:`run`) and ``vlsi-verbalize`` (:func:`run_verbalize`), read top to bottom.

Both prepare a model and data, then hand stages (:mod:`vlsi.train.stages`) to the one loop
(:class:`vlsi.train.engine.Engine`); neither steps an optimizer itself.

``run(cfg)``:

1. open the cache (read-only), load the student, refuse a tokenizer that does not match the cache's fingerprint;
2. join dataset + cache + student encoding (:mod:`vlsi.train.join`): content hashes, input ids and answer
   positions must agree, per ``--on-bad-sample``;
3. run the stages of ``--stages`` in order (verbalize: the student's verbalizers into ODIR/verbalizers; interact;
   sft). The student stages share one trainable set (LoRA, or ``--full`` / ``--train-all``), so the same adapter
   continues from interact into sft and is merged once at export;
4. ODIR/final: a plain transformers directory with tokenizer + processor files.

``run_verbalize(cfg)``: the verbalize stage alone on a frozen model (teacher or student), into OUT.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from vlsi.common.errors import VlsiError

from .config import TrainConfig, VerbalizeConfig

__all__ = ["run", "run_verbalize"]


def _load(name: str, cfg, layers, world):
    """The model, and ``layers`` resolved (given, the preset's, or the family's rule for the model's depth)."""
    from vlsi.models.adapter import load_model

    from .checkpoint import seed_everything

    seed_everything(cfg.seed)
    if not world.main:  # transformers' loading bar: once per run, on rank 0
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device_map = getattr(cfg, "device_map", None)  # vlsi-verbalize: a frozen model spread over GPUs (accelerate)
    adapter = load_model(name, dtype=cfg.dtype, device=cfg.device, device_map=device_map,
                         max_memory=getattr(cfg, "max_memory", None) or None)
    if device_map is not None:
        _say(cfg, world, f"[load] {adapter.name} spread over {_placement(adapter)}")
    if layers:
        return adapter, tuple(layers), "given"
    chosen, source = adapter.target_layers
    return adapter, tuple(chosen), source


def _placement(adapter) -> str:
    """``cuda:0 layers 0-9, cuda:1 layers 10-19, ...; head on cuda:1`` (one line)."""
    runs: list = []
    for i in range(adapter.num_layers):
        dev = str(adapter.layer_device(i))
        if runs and runs[-1][0] == dev:
            runs[-1][2] = i
        else:
            runs.append([dev, i, i])
    parts = [f"{d} layers {a}-{b}" if a != b else f"{d} layer {a}" for d, a, b in runs]
    return f"{', '.join(parts)}; final norm on {adapter.norm_device}, head on {adapter.head_device}"


def _say(cfg, world, msg: str) -> None:
    if cfg.progress and world.main:  # one progress output per run, not one per rank
        print(msg, file=sys.stderr, flush=True)


def _world(cfg):
    """The data-parallel world (torchrun) and the config with this rank's device."""
    import torch

    from .distributed import init_from_env

    world = init_from_env(cfg.device)
    if world.size > 1 and (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        cfg = dataclasses.replace(cfg, device=f"cuda:{world.local_rank}")
    return world, cfg


def _engine(cfg, adapter, out: Path, policy, world):
    from vlsi.models.encoding import pad_id_of

    from .engine import Engine, LoopSettings

    return Engine(out, LoopSettings.from_config(cfg), device=adapter.device, pad_id=pad_id_of(adapter.tokenizer),
                  bad_samples=policy, world=world)


def _open_data(cfg, out: Path, world):
    """The dataset as an index (built once, reused), and the bad-sample policy of the run. Records that failed while
    indexing go through the policy now, before training; the others are checked when loaded."""
    from vlsi.models.data import BadSamplePolicy
    from vlsi.models.dataset import open_dataset

    data = open_dataset(cfg.data, image_root=cfg.image_root, storage_options=getattr(cfg, "storage_options", None),
                        progress=cfg.progress and world.main)
    policy = BadSamplePolicy(cfg.on_bad_sample)
    for err in data.bad_entries:
        policy.handle(err)
    if policy.report.count and world.main:
        policy.report.write(out / "bad_samples.jsonl")
    if len(data) == 0:
        raise VlsiError(f"{cfg.data}: no usable samples ({policy.report.count} bad)")
    return data, policy


def _verify(cfg, dataset, policy, out: Path, world) -> None:
    """``--verify-join full``: every sample loaded and checked once before training."""
    from .join import verify_all

    verify_all(dataset, policy, progress=cfg.progress and world.main)
    if policy.report.count and world.main:
        policy.report.write(out / "bad_samples.jsonl")


def run_verbalize(cfg: VerbalizeConfig) -> dict:
    """Train verbalizers of the frozen ``cfg.model``; returns a JSON-able summary (also OUT/summary.json)."""
    from vlsi.models.verbalizers import VerbalizerSet

    from .engine import prepare_out
    from .stages import StageInputs, STAGES

    out = Path(cfg.out)
    world, cfg = _world(cfg)
    adapter, layers, source = _load(cfg.model, cfg, cfg.layers, world)
    cfg = dataclasses.replace(cfg, layers=layers)  # the effective config names the chosen layers
    _say(cfg, world, f"[verbalize] {adapter.name}: target layers {','.join(map(str, layers))} ({source})")
    prepare_out(out, cfg, write=world.main, world_size=world.size)
    data, policy = _open_data(cfg, out, world)
    vs = VerbalizerSet.for_model(adapter, layers, kind=cfg.kind)  # each on its layer's device (VerbalizerSet.place)
    vs.float().train()  # fp32 master weights; autocast handles bf16 compute on GPU
    engine = _engine(cfg, adapter, out, policy, world)
    inputs = StageInputs(adapter, data, cfg, verbalizers=lambda: vs)
    stage = STAGES["verbalize"](inputs)
    if cfg.verify_join == "full":
        _verify(cfg, stage.dataset, policy, out, world)
    total = engine.s.total_steps(cfg.steps, cfg.epochs, len(data), world.size)
    res = _finish_verbalize(engine, stage, total, vs, adapter, out)
    report = policy.report
    summary = {"out": str(out), "model": adapter.name, "kind": cfg.kind, "layers": list(layers),
               "layers_source": source, "samples": len(data) - report.count, "skipped": report.count, **res}
    if report.count:
        summary["bad_sample_report"] = str(out / "bad_samples.jsonl")
    _write_json(out / "summary.json", summary, world)
    return summary


def _finish_verbalize(engine, stage, total: int, vs, adapter, vdir: Path) -> dict:
    """Run the verbalize stage (unless done) and save the verbalizers once it has finished."""
    done = engine.stage_done("verbalize")
    res = {"step": total, "total_steps": total, "finished": True} if done else engine.run(stage, total)
    if res["finished"] and not (vdir / "verbalizers.json").is_file() and engine.world.main:
        res["verbalizer_sha256"] = vs.save(vdir, adapter.fingerprint())
    engine.world.barrier()  # the saved verbalizers exist before any rank reads them
    first, last = res.pop("first", None), res.pop("last", None)
    res["first_loss_per_layer"] = first and first["loss_per_layer"]
    res["last_loss_per_layer"] = last and last["loss_per_layer"]
    return res


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns a JSON-able summary (also written to ODIR/summary.json)."""
    if cfg.method == "genrecal":  # any student tokenizer: its own recipe (vlsi.train.genrecal)
        from .genrecal import run_genrecal

        return run_genrecal(cfg)
    from vlsi.cache_format import CacheError, open_cache
    from vlsi.models.verbalizers import VerbalizerSet, load_verbalizers

    from .distributed import shard_student
    from .engine import prepare_out
    from .join import JoinError, check_student_fingerprint
    from .stages import STAGES, StageInputs

    out = Path(cfg.out)
    world, cfg = _world(cfg)
    reader = None  # no cache: stages that need no teacher (verbalize, sft) train from the dataset alone
    if cfg.cache is not None:
        try:
            reader = open_cache(cfg.cache, storage_options=cfg.storage_options or None)
        except CacheError as e:
            raise JoinError(f"cannot open cache: {e}") from None
    adapter, layers, source = _load(cfg.student, cfg, cfg.student_layers, world)
    if "verbalize" in cfg.stages:
        cfg = dataclasses.replace(cfg, student_layers=layers)  # the effective config names the chosen layers
        _say(cfg, world, f"[train] {adapter.name}: student target layers {','.join(map(str, layers))} ({source})")
    prepare_out(out, cfg, exclude=("storage_options",), write=world.main, world_size=world.size)
    if reader is not None:
        check_student_fingerprint(reader, adapter.tokenizer, url=cfg.cache)
    data, policy = _open_data(cfg, out, world)
    teacher_layers = list(reader.fingerprint.target_layers) if reader is not None else []
    engine = _engine(cfg, adapter, out, policy, world)
    vdir = out / "verbalizers"
    state: dict = {}

    def verbalizers():
        if "vs" not in state:
            if cfg.student_verbalizers:
                state["vs"] = load_verbalizers(cfg.student_verbalizers, adapter=adapter)
            elif "verbalize" in cfg.stages and not engine.stage_done("verbalize"):
                state["vs"] = VerbalizerSet.for_model(adapter, layers, kind=cfg.verbalizer_kind).float().train()
            elif (vdir / "verbalizers.json").is_file():
                state["vs"] = load_verbalizers(vdir, adapter=adapter)
            else:
                raise VlsiError(f"{out}: the interact stage needs student verbalizers: run the verbalize stage "
                                "or pass --student-verbalizers VDIR")
        return state["vs"]

    def trainable():
        if "modules" not in state:
            state["modules"] = [("model", _trainable_student(adapter, cfg))]
            state["parallel"] = _parallel(cfg, world, adapter)
            if state["parallel"] == "fsdp":  # in place: the stages' modules hold sharded parameters from now on
                shard_student(adapter, world)
            if world.size > 1:
                _say(cfg, world, f"[train] {world.size} ranks, --parallel {state['parallel']}")
        return state["modules"]

    inputs = StageInputs(adapter, data, cfg, cache_url=cfg.cache, storage_options=cfg.storage_options or None,
                         teacher_layers=teacher_layers, verbalizers=verbalizers, trainable=trainable)
    if cfg.verify_join == "full":
        _verify(cfg, inputs.dataset(), policy, out, world)
    summary = {"out": str(out), "student": adapter.name, "samples": len(data) - policy.report.count, "skipped": policy.report.count,
               "teacher_layers": teacher_layers, "student_layers": None, "stages": {}}
    for name in cfg.stages:
        total = engine.s.total_steps(cfg.stage_steps(name), cfg.epochs, len(data), world.size)
        stage = STAGES[name](inputs)
        if name == "verbalize":
            res = _finish_verbalize(engine, stage, total, verbalizers(), adapter, vdir)
        elif engine.stage_done(name):  # finished by an earlier process: continue from its weights
            engine.restore(stage.modules)
            continue
        else:
            res = engine.run(stage, total)
            res.pop("first", None), res.pop("last", None)
        summary["stages"][name] = res
        summary["skipped"] = policy.report.count
        summary["samples"] = len(data) - policy.report.count
        if not res["finished"]:
            summary["finished"] = False
            _write_json(out / "summary.json", summary, world)
            return summary
    if "interact" in cfg.stages or "verbalize" in cfg.stages:
        summary["student_layers"] = list(verbalizers().layers)

    from .export import export_final

    trainable()
    summary["final"] = str(out / "final")
    whole = _gather_weights(adapter.model) if state.get("parallel") == "fsdp" else None  # a collective: every rank
    if world.main:
        export_final(adapter, out / "final", state_dict=whole, provenance={
            "cache": cfg.cache, "cache_fingerprint_digest": reader.fingerprint.digest() if reader is not None else None,
            "stages": list(cfg.stages), "teacher_layers": teacher_layers, "student_layers": summary["student_layers"],
            "world_size": world.size, "parallel": state["parallel"]})
    summary["finished"] = True
    _write_json(out / "summary.json", summary, world)
    return summary


def _trainable_student(adapter, cfg: TrainConfig):
    """Make the student's trainable set (LoRA with fp32 adapters, or full / everything) and return the model."""
    from .lora import apply_lora, enable_full_training

    if cfg.full or cfg.train_all:
        enable_full_training(adapter, everything=cfg.train_all)
    else:
        apply_lora(adapter, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, seed=cfg.seed)
        for p in adapter.model.parameters():
            if p.requires_grad:  # fp32 master weights for the adapters, whatever the base dtype
                p.data = p.data.float()
    if cfg.grad_checkpointing:
        adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter.model.train()  # dropout stays as configured (the supported families use 0 attention dropout)
    return adapter.model


def _parallel(cfg: TrainConfig, world, adapter) -> str:
    """``--parallel`` resolved for this run (after the trainable set is made): ``ddp`` or ``fsdp``.

    ``auto`` is fsdp only for a full fine-tune (``--full`` / ``--train-all``) of several ranks on GPUs whose training
    state does not fit comfortably on one: the trainable parameters' weights, gradients and two AdamW moments
    (4 x their bytes) plus the frozen weights above half of one GPU's memory. Everything else (LoRA, small students,
    CPU) is ddp: replicated weights and one all-reduce of the gradients cost less than FSDP's gathers."""
    import torch

    if world.size == 1 or cfg.parallel == "ddp":
        return "ddp"
    if cfg.parallel == "fsdp":
        return "fsdp"
    if not (cfg.full or cfg.train_all) or adapter.device.type != "cuda":
        return "ddp"
    params = list(adapter.model.parameters())
    need = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in params)
    return "fsdp" if need > 0.5 * torch.cuda.get_device_properties(adapter.device).total_memory else "ddp"


def _gather_weights(model) -> dict:
    """The whole weights of an FSDP-sharded model, on rank 0's CPU (other ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_json(path: Path, obj, world) -> None:
    if not world.main:  # rank 0 alone writes to the output folder
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
