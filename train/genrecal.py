"""``vlsi-train --method genrecal``: distil into a student with ANY tokenizer (docs/method.md "GenRecal").

``run_genrecal(cfg, features=None)``, read top to bottom:

1. the teacher features: a :class:`~vlsi.train.genrecal_data.FeatureSource`: ``--cache`` (a cache written by
   ``vlsi-extract --hidden-states answer|all``, :class:`~vlsi.train.genrecal_data.CacheFeatures`; a top-k-only
   cache is refused in one line), or a programmatic ``features=`` source;
2. the student (``--student``) and the teacher's head + final norm only (``--teacher-head``, the head-only loader:
   ~2.5 GB for a 72B teacher, never its body); the head's fingerprint must equal the features' teacher's;
3. the Recalibrator (:mod:`vlsi.models.recalibrator`), fp32 master weights, seeded by ``--seed``;
4. the stages of ``--stages`` (recalibrate, joint, sft) through the one engine; a stage finished by an earlier
   process hands its weights on (:func:`_carry_over`);
5. ``ODIR/recalibrator/`` (the Recalibrator, for analysis and later stages) and ``ODIR/final``: a plain HF
   directory of the student, as for VLsI.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlsi.common.errors import VlsiError

from .config import TrainConfig

__all__ = ["run_genrecal", "build_recalibrator", "evaluate_recalibrator"]


def build_recalibrator(adapter, head, cfg: TrainConfig):
    """The run's Recalibrator on the student's device, fp32, initialised per ``--rec-init`` from ``--seed``."""
    import torch

    from vlsi.models.recalibrator import Recalibrator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 17)
        rec = Recalibrator(adapter.text_config, head.hidden_size, n_blocks=cfg.rec_blocks, norm=cfg.rec_norm)
    rec = rec.float().to(adapter.device)
    if cfg.rec_init == "identity":
        rec.identity_init(head.final_norm.weight)
    return rec.train()


def _features(cfg: TrainConfig, features):
    if features is not None:
        return features
    if cfg.cache is None:
        raise VlsiError("--method genrecal: the recalibrate and joint stages need teacher features: --cache CACHE "
                        "written by vlsi-extract --hidden-states answer|all")
    from vlsi.cache_format import CacheError, open_cache

    from .genrecal_data import CacheFeatures

    try:
        reader = open_cache(cfg.cache, storage_options=cfg.storage_options or None)
    except CacheError as e:
        raise VlsiError(f"cannot open cache: {e}") from None
    return CacheFeatures(reader)


def _needs_question(cfg: TrainConfig) -> bool:
    """The regulariser reads the teacher's question rows (``--genrecal-reg-rows question``, weight > 0)."""
    return cfg.genrecal_reg > 0 and cfg.genrecal_reg_rows == "question"


def _carry_over(engine, modules) -> int:
    """Copy into ``modules`` the parameters of the latest checkpoint that they share (by prefixed name): a stage
    started after a finished one (recalibrate -> joint: the Recalibrator; joint -> sft: the student's set), also
    when a restart came between them. Returns how many tensors were copied."""
    import torch

    from .checkpoint import latest_checkpoint, read_trainable

    latest = latest_checkpoint(engine.ckpt_root) if engine.ckpt_root.exists() else None
    if latest is None:
        return 0
    prev = read_trainable(latest)
    n = 0
    with torch.no_grad():
        for prefix, mod in modules:
            for name, p in mod.named_parameters():
                t = prev.get(f"{prefix}.{name}")
                if p.requires_grad and t is not None:
                    p.copy_(t.to(p.device, p.dtype))
                    n += 1
    return n


def evaluate_recalibrator(rec, adapter, head, dataset, *, batch_size: int = 4, chunk_tokens: int = 1024) -> dict:
    """Mean per-teacher-row ``kl`` and ``ce`` of the main pass on ``dataset`` (a GenRecalDataset), no gradient:
    the held-out measure of stage 1."""
    import torch

    with torch.no_grad():
        return _evaluate(rec, adapter, head, dataset, batch_size, chunk_tokens)


def _evaluate(rec, adapter, head, dataset, batch_size: int, chunk_tokens: int) -> dict:
    import torch

    from vlsi.models.encoding import pad_id_of

    from .genrecal_losses import head_ce_kl
    from .genrecal_stages import split_student_rows
    from .join import collate_joined

    was = rec.training
    rec.eval()
    kl_sum = ce_sum = 0.0
    rows = 0
    for s in range(0, len(dataset), batch_size):
        batch, feats, rejected = collate_joined([dataset[i] for i in range(s, min(len(dataset), s + batch_size))],
                                                pad_id_of(adapter.tokenizer))
        if rejected:
            raise rejected[0].error
        hid = adapter.forward_hidden(batch, [], rows="all")
        q_s, _ = split_student_rows(hid, batch)
        dev = rec.pre.weight.device
        z_a = [z.to(dev, rec.pre.weight.dtype) for z in feats.z_answer]
        r = rec.answer_rows([q.to(dev) for q in q_s], [rec.pre(z) for z in z_a])
        ce, kl = head_ce_kl(r, torch.cat(z_a), head.lm_head.weight, feats.answer_ids.to(dev),
                            real_vocab=head.vocab_size, chunk_tokens=chunk_tokens)
        kl_sum, ce_sum, rows = kl_sum + float(kl.sum()), ce_sum + float(ce.sum()), rows + int(kl.numel())
    rec.train(was)
    return {"kl": kl_sum / max(1, rows), "ce": ce_sum / max(1, rows), "rows": rows}


def run_genrecal(cfg: TrainConfig, *, features=None) -> dict:
    """Train per ``cfg`` (``cfg.method == "genrecal"``); returns a JSON-able summary (also ODIR/summary.json).
    ``features``: a FeatureSource instead of ``--cache`` (module doc)."""
    from vlsi.models.head_only import load_head_only

    from .engine import prepare_out
    from .genrecal_data import GenRecalDataset, check_teacher_head
    from .genrecal_stages import GenRecalInputs
    from .recipe import _engine, _load, _open_data, _say, _trainable_student, _world, _write_json
    from .stages import STAGES, StageInputs

    out = Path(cfg.out)
    world, cfg = _world(cfg)
    needs_teacher = any(s in cfg.stages for s in ("recalibrate", "joint"))
    source = _features(cfg, features) if needs_teacher else None
    adapter, _, _ = _load(cfg.student, cfg, None, world)
    prepare_out(out, cfg, exclude=("storage_options",), write=world.main, world_size=world.size)
    head = rec = None
    if needs_teacher:
        head = load_head_only(cfg.teacher_head, dtype=adapter.dtype, device=adapter.device)
        check_teacher_head(source.teacher_fingerprint, head.fingerprint(), where=cfg.cache or "features")
        if hasattr(source, "check_head"):  # a cache also holds the head's top-k: the weights must reproduce it
            _say(cfg, world, f"[genrecal] --teacher-head reproduces the cache's top-k within "
                      f"{source.check_head(head):.4f} nats (mean)")
        if _needs_question(cfg) and not source.has_question:
            raise VlsiError(f"{cfg.cache or 'features'}: no teacher question features for the regulariser: extract "
                            "with --hidden-states all, or pass --genrecal-reg-rows answer or --genrecal-reg 0")
        rec = build_recalibrator(adapter, head, cfg)
        _say(cfg, world, f"[genrecal] {adapter.name} <- head of {head.name}: Recalibrator d {head.hidden_size} -> "
                  f"{adapter.hidden_size}, {cfg.rec_blocks} blocks, {sum(p.numel() for p in rec.parameters())} params")
    data, policy = _open_data(cfg, out, world)
    engine = _engine(cfg, adapter, out, policy, world)
    state: dict = {}

    def trainable():
        if "modules" not in state:
            state["modules"] = [("model", _trainable_student(adapter, cfg))]
        return state["modules"]

    def make_dataset():
        return GenRecalDataset(data, source, adapter.bundle, head.tokenizer, d_teacher=head.hidden_size,
                               need_question=_needs_question(cfg), max_length=cfg.max_length)

    inputs = StageInputs(adapter, data, cfg, trainable=trainable,
                         genrecal=GenRecalInputs(rec, head, make_dataset) if needs_teacher else None)
    summary = {"out": str(out), "method": "genrecal", "student": adapter.name,
               "teacher_head": head.name if head is not None else None, "stages": {}}
    for name in cfg.stages:
        total = engine.s.total_steps(cfg.stage_steps(name), cfg.epochs, len(data), world.size)
        stage = STAGES[name](inputs)
        _carry_over(engine, stage.modules)
        if engine.stage_done(name):
            continue
        res = engine.run(stage, total)
        res.pop("first", None), res.pop("last", None)
        summary["stages"][name] = res
        summary["skipped"] = policy.report.count
        if not res["finished"]:
            summary["finished"] = False
            _write_json(out / "summary.json", summary, world)
            return summary
        if rec is not None and name in ("recalibrate", "joint") and world.main:
            _save_recalibrator(rec, out / "recalibrator", cfg, head)

    from .export import export_final

    trainable()
    summary["final"] = str(out / "final")
    if world.main:
        export_final(adapter, out / "final", provenance={
            "method": "genrecal", "stages": list(cfg.stages), "cache": cfg.cache,
            "teacher_head": head.fingerprint() if head is not None else cfg.teacher_head, "world_size": world.size})
    summary["finished"] = True
    _write_json(out / "summary.json", summary, world)
    return summary


def _save_recalibrator(rec, path: Path, cfg: TrainConfig, head) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in rec.state_dict().items()},
              str(path / "recalibrator.safetensors"))
    (path / "recalibrator.json").write_text(json.dumps(
        {"format": "vlsi.recalibrator.v1", "d_teacher": rec.d_teacher, "d_student": rec.d_student,
         "n_blocks": rec.n_blocks, "norm": rec.norm_kind, "teacher": head.fingerprint(), "student": cfg.student},
        indent=2, sort_keys=True, default=str) + "\n")
