"""GenRecal's recalibrate and joint stages as loss steps of the one engine (docs/method.md "GenRecal").

Both run, per micro-batch (``feats``: the :class:`~vlsi.train.genrecal_data.FeatureBatch` of the batch's samples):

- the student's post-final-norm states at every position (``forward_hidden(rows="all")``), split per sample into
  its question rows (:func:`~vlsi.train.genrecal_data.question_rows`) and answer rows;
- main pass: ``r = Rec([z_S question ; pre(z_T answer)])`` at the teacher answer rows;
- regulariser (``reg_weight > 0``): ``Rec([pre(z_T question) ; pre(z_T answer)])``, or with ``reg_rows="answer"``
  ``Rec(pre(z_T answer))`` (no question rows: what an answer-only feature cache allows);
- CE(head_T(r), teacher answer ids) + KL(softmax head_T(z_T answer) || softmax head_T(r)) for both
  (:func:`~vlsi.train.genrecal_losses.genrecal_terms`), the teacher head frozen.

``recalibrate``: only the Recalibrator trains; the student runs under ``no_grad``.
``joint``: the Recalibrator and the student's trainable set (LoRA / full) train; the gradient reaches the student
through its question states, plus the student's own next-token CE on its answer rows.
The third stage, ``sft``, is the project's :class:`~vlsi.train.stages.SftStage` (vision encoder frozen unless
``--train-all``).

Normalisation: the engine divides by ``n_norm``, the STUDENT's answer rows of the step (its only count). The
teacher-row sums are divided by it too, so the GenRecal terms carry a factor (teacher answer tokens / student
answer tokens) of the step, close to 1 for similar tokenizers; the student CE is exactly per student row. Gradient
accumulation stays exact (one divisor per step).
"""

from __future__ import annotations

import torch

from .engine import Stage, StepMetrics
from .genrecal_data import question_rows
from .genrecal_losses import genrecal_terms
from .losses import sft_loss

__all__ = ["RecalibrateStage", "JointStage", "split_student_rows"]


def split_student_rows(hid, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """From ``forward_hidden(rows="all")``: per-sample question states [Q_b, d_S] and the answer rows' states
    [sum A_b, d_S] (batch order, the order of ``batch.answer_targets``)."""
    questions, answers, off = [], [], 0
    for b, n in enumerate(hid.row_counts):
        rows = hid.final_hidden[off:off + n]  # positions 0..n-1 of sample b (right padding)
        ap = batch.answer_positions[b].long()
        q = torch.from_numpy(question_rows(ap.numpy(), n)).to(rows.device)
        questions.append(rows[q])
        answers.append(rows[ap.to(rows.device)])
        off += n
    return questions, torch.cat(answers)


class _RecalStage(Stage):
    train_student = False

    def __init__(self, adapter, rec, head, modules, dataset, *, reg_weight: float, ce_weight: float,
                 kl_weight: float, student_ce_weight: float = 0.0, chunk_tokens: int, reg_rows: str = "question"):
        self.adapter, self.rec, self.head, self.modules, self.dataset = adapter, rec, head, modules, dataset
        self.reg_weight, self.ce_weight, self.kl_weight = reg_weight, ce_weight, kl_weight
        self.student_ce_weight, self.chunk_tokens = student_ce_weight, chunk_tokens
        if reg_rows not in ("question", "answer"):
            raise ValueError(f"reg_rows must be 'question' or 'answer', got {reg_rows!r}")
        self.reg_rows = reg_rows

    def loss_step(self, batch, feats, n_norm, micro):
        ad, rec = self.adapter, self.rec
        dev, wdt = rec.pre.weight.device, rec.pre.weight.dtype  # features may be stored bf16: the linears' dtype
        with torch.set_grad_enabled(self.train_student and torch.is_grad_enabled()):
            hid = ad.forward_hidden(batch, [], rows="all")
        q_s, a_s = split_student_rows(hid, batch)
        z_a = [z.to(dev, wdt) for z in feats.z_answer]
        pa = [rec.pre(z) for z in z_a]  # teacher answer rows in student space
        r_main = rec.answer_rows([q.to(dev) for q in q_s], pa)
        r_reg = None
        if self.reg_weight > 0 and self.reg_rows == "answer":  # teacher answer rows alone, no question part
            r_reg = rec.answer_rows([p.new_zeros((0, p.shape[1])) for p in pa], pa)
        elif self.reg_weight > 0:
            r_reg = rec.answer_rows([rec.pre(z.to(dev, wdt)) for z in feats.z_question], pa)
        w = self.head.lm_head.weight
        terms = genrecal_terms(r_main, r_reg, torch.cat(z_a).to(w.device), w, feats.answer_ids.to(w.device),
                               real_vocab=self.head.vocab_size, ce_weight=self.ce_weight, kl_weight=self.kl_weight,
                               reg_weight=self.reg_weight, chunk_tokens=self.chunk_tokens)
        loss = terms.loss / n_norm
        sums = {"rec_ce": terms.ce / n_norm, "rec_kl": terms.kl / n_norm, "teacher_rows": terms.rows}
        if r_reg is not None:
            sums.update(reg_ce=terms.reg_ce / n_norm, reg_kl=terms.reg_kl / n_norm)
        if self.train_student and self.student_ce_weight > 0:
            s_ce = sft_loss(a_s, ad.lm_head.weight, batch.answer_targets.to(a_s.device), real_vocab=ad.vocab_size,
                            n_norm=n_norm, chunk_tokens=self.chunk_tokens)
            loss = loss + self.student_ce_weight * s_ce.to(loss.device)
            sums["student_ce"] = float(s_ce.detach())
        return loss, StepMetrics(sums=sums)

    def postfix(self, rec: dict) -> str:
        return f"kl {rec.get('rec_kl', 0):.3f} ce {rec.get('rec_ce', 0):.3f}"


class RecalibrateStage(_RecalStage):
    """Stage 1: the Recalibrator alone (student frozen, run without gradient)."""

    name = "recalibrate"


class JointStage(_RecalStage):
    """Stage 2: the Recalibrator + the student's trainable set, with the student's own answer CE."""

    name = "joint"
    train_student = True


class GenRecalInputs:
    """What the GenRecal builders need beyond :class:`~vlsi.train.stages.StageInputs`: the Recalibrator, the
    head-only teacher and the features dataset (made once, on first use)."""

    def __init__(self, recalibrator, head, make_dataset):
        self.recalibrator, self.head, self._make, self._ds = recalibrator, head, make_dataset, None

    def dataset(self):
        if self._ds is None:
            self._ds = self._make()
        return self._ds


def _weights(c) -> dict:
    return dict(reg_weight=c.genrecal_reg, ce_weight=c.genrecal_ce_weight, kl_weight=c.genrecal_kl_weight,
                chunk_tokens=c.chunk_tokens, reg_rows=c.genrecal_reg_rows)


def build_recalibrate(x) -> Stage:
    g = x.genrecal
    g.recalibrator.requires_grad_(True)
    return RecalibrateStage(x.adapter, g.recalibrator, g.head, [("recalibrator", g.recalibrator)], g.dataset(),
                            **_weights(x.settings))


def build_joint(x) -> Stage:
    g = x.genrecal
    g.recalibrator.requires_grad_(True)
    modules = x.trainable() + [("recalibrator", g.recalibrator)]
    return JointStage(x.adapter, g.recalibrator, g.head, modules, g.dataset(),
                      student_ce_weight=x.settings.student_ce_weight, **_weights(x.settings))
