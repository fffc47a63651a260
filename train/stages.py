"""The training stages as loss steps for :class:`vlsi.train.engine.Engine`, and the registry that names them.

Each stage is a small class: its trainable ``modules``, its ``dataset`` and ``loss_step(batch, targets, n_norm)``.
Adding a stage = one :class:`~vlsi.train.engine.Stage` subclass + one ``STAGES`` entry (a builder taking the run's
:class:`StageInputs`) + its name in ``names.STAGES`` (docs/design.md "Adding a stage").

- ``verbalize`` (VLsI step 1, docs/method.md): backbone frozen and run under ``no_grad``; only the verbalizers
  train. Loss: per-layer CE of ``lm_head(final_norm(verbalizer_l(h_l)))`` on the next token, summed over layers.
- ``interact`` (step 2): per micro-batch, the no-grad ``[ts x tl]`` KL matrix -> layer matching -> sparse KL with
  grad at the matched pairs + the final layer (:func:`vlsi.train.losses.interaction_loss`).
- ``sft`` (step 3): next-token CE of the native head on the answers.
- ``recalibrate`` / ``joint``: GenRecal's first two stages (:mod:`vlsi.train.genrecal_stages`); GenRecal's third
  is ``sft``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import Stage, StepMetrics
from .join import JoinedDataset
from .losses import interaction_loss, sft_loss

__all__ = ["StageInputs", "VerbalizeStage", "InteractStage", "SftStage", "STAGES", "verbalization_loss"]


@dataclass
class StageInputs:
    """What a recipe prepared, shared by the stage builders: the model, data, cache and the method's settings."""

    adapter: object
    data: object
    """The dataset (:class:`vlsi.models.dataset.Dataset`): an index, samples are read when loaded."""
    settings: object
    """The command's config (read for the method's options by the builders only, never inside a loss step)."""
    cache_url: str | None = None
    storage_options: dict | None = None
    teacher_layers: list = field(default_factory=list)
    verbalizers: Callable | None = None
    """``() -> VerbalizerSet``: the (student) verbalizers, created or loaded on first use."""
    trainable: Callable | None = None
    """``() -> [(prefix, module)]``: what trains in the student stages (LoRA / full), set up on first use."""
    genrecal: object | None = None
    """``--method genrecal``: a :class:`vlsi.train.genrecal_stages.GenRecalInputs` (Recalibrator, teacher head,
    features dataset)."""

    def dataset(self) -> JoinedDataset:
        """The joined dataset: with a cache, every stage's samples are checked against it (the student's encoding
        must reproduce the cached ids), and the stages that need no teacher ignore the targets."""
        return JoinedDataset(self.data, self.cache_url, self.adapter.bundle,
                             storage_options=self.storage_options, max_length=self.settings.max_length)


def verbalization_loss(vs, adapter, batch, *, chunk_tokens: int | None = None):
    """Summed (not averaged) verbalization loss of one batch: ``sum_l sum_rows CE_l`` and its per-layer parts.

    The backbone runs under ``no_grad``; gradients reach only the verbalizers (the head and final norm are frozen
    and shared). CE is over the real vocab, chunked over tokens (``vlsi.ops.ce_from_hidden``): no [rows x vocab]
    logits for all layers at once. Returns ``(loss tensor, {layer: float sum})``; divide by the answer-token count.
    """
    from vlsi.models.verbalizers import verbalized_states
    from vlsi.ops import ce_from_hidden

    head_b = getattr(adapter.lm_head, "bias", None)
    targets = batch.answer_targets.to(adapter.device)
    states, _ = verbalized_states(vs, adapter, batch)
    loss, sums = 0.0, {}
    for i in vs.layers:
        s_i = ce_from_hidden(states[i], adapter.lm_head.weight.detach(), targets, real_vocab=adapter.vocab_size,
                             head_bias=head_b.detach() if head_b is not None else None, chunk_tokens=chunk_tokens).sum()
        sums[i] = float(s_i.detach())
        loss = loss + s_i
    return loss, sums


class _StudentGroups:
    """The student stages' optimizer groups: the vision encoder at ``vision_lr_scale`` x the LR (its own group:
    a from-scratch vision tower wants a smaller step than the language model), everything else at the LR."""

    vision_lr_scale: float = 1.0

    def param_groups(self) -> list[dict]:
        vision = {id(p) for m in self.adapter.vision_module for p in m.parameters()}
        params = self.parameters()
        return [{"params": [p for p in params if id(p) not in vision], "lr_scale": 1.0},
                {"params": [p for p in params if id(p) in vision], "lr_scale": self.vision_lr_scale}]


class VerbalizeStage(Stage):
    name = "verbalize"

    def __init__(self, adapter, vs, dataset, *, chunk_tokens: int):
        self.adapter, self.vs, self.dataset, self.chunk_tokens = adapter, vs, dataset, chunk_tokens
        self.modules = [("verbalizers", vs)]

    def loss_step(self, batch, targets, n_norm, micro):
        loss, sums = verbalization_loss(self.vs, self.adapter, batch, chunk_tokens=self.chunk_tokens)
        return loss / n_norm, StepMetrics(sums={"loss_per_layer": {str(i): v / n_norm for i, v in sums.items()}})

    def log_fields(self) -> dict:
        return {"layers": list(self.vs.layers)}

    def postfix(self, rec: dict) -> str:
        return " ".join(f"L{k}:{v:.2f}" for k, v in rec["loss_per_layer"].items())


class InteractStage(_StudentGroups, Stage):
    name = "interact"

    def __init__(self, adapter, vs, modules, dataset, *, teacher_layers, loss_kwargs: dict, seed: int,
                 chunk_tokens: int, vision_lr_scale: float = 1.0):
        self.adapter, self.vs, self.modules, self.dataset = adapter, vs, modules, dataset
        self.vision_lr_scale = vision_lr_scale
        self.teacher_layers, self.loss_kwargs, self.chunk_tokens = list(teacher_layers), loss_kwargs, chunk_tokens
        self.seed = seed

    def loss_step(self, batch, targets, n_norm, micro):
        from vlsi.models.verbalizers import verbalized_states

        ad = self.adapter
        states, hid = verbalized_states(self.vs, ad, batch, backbone_grad=True)
        res = interaction_loss([states[i] for i in self.vs.layers], hid.final_hidden, ad.lm_head.weight,
                               targets.to(ad.device), batch.answer_targets.to(ad.device), real_vocab=ad.vocab_size,
                               n_norm=n_norm, generator=self._draws(micro), chunk_tokens=self.chunk_tokens,
                               **self.loss_kwargs)
        share = batch.num_answer_rows / n_norm  # per-layer KLs are means over this micro-batch: weight by its rows
        sums = {"il": res.terms["il"], "ll": res.terms["ll"], "layer_kl": [v * share for v in res.layer_kl],
                "final_kl": res.final * share if res.final is not None else None}
        draws = {"matched": list(res.matching.matched)} if res.matching is not None else {}
        return res.loss, StepMetrics(sums=sums, draws=draws)

    def _draws(self, micro: int) -> torch.Generator:
        """The matching draws of global micro-batch ``micro``: a function of (seed, micro) alone, so resumes and any
        number of ranks draw the same layers."""
        return torch.Generator().manual_seed(self.seed * 7919 + 1 + 1_000_003 * micro)

    def log_fields(self) -> dict:
        return {"student_layers": list(self.vs.layers), "teacher_layers": self.teacher_layers}


class SftStage(_StudentGroups, Stage):
    name = "sft"

    def __init__(self, adapter, modules, dataset, *, chunk_tokens: int, vision_lr_scale: float = 1.0):
        self.adapter, self.modules, self.dataset, self.chunk_tokens = adapter, modules, dataset, chunk_tokens
        self.vision_lr_scale = vision_lr_scale

    def loss_step(self, batch, targets, n_norm, micro):
        ad = self.adapter
        hid = ad.forward_hidden(batch, [], rows="answer")
        loss = sft_loss(hid.final_hidden, ad.lm_head.weight, batch.answer_targets.to(ad.device),
                        real_vocab=ad.vocab_size, n_norm=n_norm, chunk_tokens=self.chunk_tokens)
        return loss, StepMetrics()


def _verbalize(x: StageInputs) -> Stage:
    return VerbalizeStage(x.adapter, x.verbalizers(), x.dataset(),
                          chunk_tokens=x.settings.chunk_tokens)


def _interact(x: StageInputs) -> Stage:
    c = x.settings
    loss_kwargs = dict(il_loss=c.il_loss, ll_loss=c.ll_loss, direction=c.kl_direction, temperature=c.temperature,
                       match_kwargs=c.match_kwargs)
    modules = x.trainable()  # LoRA first, then the verbalizers' trainability (frozen unless --train-verbalizers)
    vs = x.verbalizers()
    vs.requires_grad_(c.train_verbalizers)
    return InteractStage(x.adapter, vs, modules + [("verbalizers", vs)], x.dataset(),
                         teacher_layers=x.teacher_layers, loss_kwargs=loss_kwargs, seed=c.seed,
                         chunk_tokens=c.chunk_tokens, vision_lr_scale=c.vision_lr_scale)


def _sft(x: StageInputs) -> Stage:
    return SftStage(x.adapter, x.trainable(), x.dataset(), chunk_tokens=x.settings.chunk_tokens,
                    vision_lr_scale=x.settings.vision_lr_scale)


from .genrecal_stages import build_joint, build_recalibrate  # noqa: E402  (GenRecal's stages, docs/method.md)

STAGES: dict[str, Callable[[StageInputs], Stage]] = {"verbalize": _verbalize, "interact": _interact,
                                                     "recalibrate": build_recalibrate, "joint": build_joint,
                                                     "sft": _sft}
"""Stage name -> builder, in the order stages run."""
