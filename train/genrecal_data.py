"""What GenRecal's stages consume: per-sample teacher features, where they come from, and the join's checks.

Teacher and student tokenize the same sample with their OWN processor and template, so their sequences differ in
length, splits and ids; nothing ever compares a student id with a teacher id. What must agree, per sample
(:func:`check_teacher_features`):

1. the dataset's content hash equals the one the features were extracted from;
2. the teacher's answer ids decode (teacher tokenizer, special tokens skipped) to the sample's assistant texts,
   whitespace-insensitively (templates may trim or add newlines around a turn);
3. shapes: ``z_answer`` is [len(answer_positions), d_teacher], ``answer_ids`` the ids at ``answer_positions + 1``,
   and ``z_question`` (when the regulariser needs it) [Q, d_teacher].

Run-wide (:func:`check_teacher_head`): the features' teacher fingerprint equals the ``--teacher-head`` model's,
field by field, or the run is refused naming the differing fields.

Row conventions (shared with the future cache arrays, see docs/method.md "GenRecal"): *answer rows* are the
positions ``t`` with ``answer_mask[t + 1]`` (``Encoded.answer_positions``, row ``t`` predicts token ``t + 1``);
*question rows* are every other position before the last answer row, ascending (:func:`question_rows`): the
system/user text, image tokens and template scaffolding the answers are conditioned on.

A :class:`FeatureSource` yields :class:`TeacherFeatures` by sample id: :class:`CacheFeatures` over a cache written by
``vlsi-extract --hidden-states answer|all`` (format 1.2 feature ``hidden-states-v1``, ``cache_format/features.py``),
or any other source (the tests also build one from a live tiny teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from vlsi.cache_format.features import question_rows
from vlsi.models.encoding import encode_sample
from vlsi.models.errors import BadSampleError, VlsiError

from .join import JoinError, Rejected

__all__ = ["TeacherFeatures", "FeatureBatch", "FeatureSource", "CacheFeatures", "question_rows",
           "check_teacher_features", "check_teacher_head", "GenRecalDataset", "FINGERPRINT_FIELDS", "NO_FEATURES"]

FINGERPRINT_FIELDS = ("name", "revision", "family", "config_hash", "num_layers", "hidden_size", "vocab_size",
                      "padded_vocab_size", "tokenizer_hash")
"""Teacher fingerprint fields that must agree between the features and ``--teacher-head``."""


@dataclass
class TeacherFeatures:
    """One sample's teacher side. ``input_ids`` int64 [T_t], ``answer_positions`` int64 [A], ``answer_ids`` int64
    [A] (= ``input_ids[answer_positions + 1]``), ``z_answer`` [A, d_T] and ``z_question`` [Q, d_T] or None:
    post-final-norm states (what the head reads) at the answer / question rows (module doc)."""

    sample_id: str
    content_hash: str
    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    answer_ids: torch.Tensor
    z_answer: torch.Tensor
    z_question: torch.Tensor | None = None

    @staticmethod
    def cat(parts: Sequence["TeacherFeatures"]) -> "FeatureBatch":
        """The micro-batch's features (``collate_joined`` calls ``type(targets).cat``)."""
        return FeatureBatch(list(parts))


@dataclass
class FeatureBatch:
    """The teacher features of a micro-batch, per sample in batch order (the sequences are joined per sample)."""

    items: list

    @property
    def num_rows(self) -> int:
        return sum(int(f.answer_ids.shape[0]) for f in self.items)

    @property
    def answer_ids(self) -> torch.Tensor:
        return torch.cat([f.answer_ids for f in self.items])

    @property
    def z_answer(self) -> list[torch.Tensor]:
        return [f.z_answer for f in self.items]

    @property
    def z_question(self) -> list[torch.Tensor]:
        missing = [f.sample_id for f in self.items if f.z_question is None]
        if missing:
            raise JoinError(f"sample {missing[0]!r}: no teacher question features (the regulariser needs a cache "
                            "extracted with --hidden-states all, or pass --genrecal-reg 0)")
        return [f.z_question for f in self.items]


@runtime_checkable
class FeatureSource(Protocol):
    """Teacher features by sample id (the feature cache's reader will implement this)."""

    @property
    def teacher_fingerprint(self) -> dict:
        """The teacher's ``model_fingerprint`` dict the features were extracted with."""

    @property
    def has_question(self) -> bool:
        """True when ``z_question`` is stored (``--hidden-states all``)."""

    def get(self, sample_id: str) -> TeacherFeatures:
        """The sample's features; ``KeyError`` when absent."""


NO_FEATURES = ("holds no teacher hidden-state features (arrays hidden_answer / hidden_question): --method genrecal "
               "needs a cache written by vlsi-extract --hidden-states answer|all")


class CacheFeatures:
    """:class:`FeatureSource` over a feature cache: ``get(id)`` is the reader's per-sample lookup (hashed ids in the
    sample tables, byte-range reads of the sample's rows), the bf16 bit patterns viewed as bf16 tensors. Pickles
    as the reader does (URL + options; DataLoader workers reopen)."""

    def __init__(self, reader):
        fp = reader.fingerprint
        if fp.hidden_states == "none":
            version = ".".join(str(v) for v in reader.attrs.get("format_version", ["?"]))
            raise JoinError(f"{reader.url}: cache format {version} {NO_FEATURES}")
        self.reader = reader
        self.has_question = fp.hidden_states == "all"
        # the teacher's model_fingerprint as the extractor split it into the cache fingerprint
        self.teacher_fingerprint = dict(fp.teacher, tokenizer_hash=fp.tokenizer_hash, processor=fp.processor,
                                        vocab_size=fp.teacher.get("vocab_size", fp.vocab_size),
                                        padded_vocab_size=fp.teacher.get("padded_vocab_size", fp.padded_vocab_size))

    def check_head(self, head, *, rows: int = 256, max_nats: float = 0.25) -> float:
        """Refuse a ``--teacher-head`` whose weights are not the ones the cache was extracted with (a fingerprint
        holds the config, not the weights: a fine-tuned checkpoint of the same model has the same one). The
        cache's final-head top-k log-probs of its first ``rows`` answer rows are recomputed from the stored states
        with ``head``; the mean absolute difference must stay below ``max_nats`` (bf16 states, fp16 values and a
        bf16 head leave a few hundredths). Returns the difference."""
        from vlsi.cache_format.features import float32_of_bits

        zs, ids, lps, n = [], [], [], 0
        for i in range(len(self.reader)):  # random access: only the first samples' rows are read
            if n >= rows:
                break
            rec = self.reader[i]
            take = min(len(rec.answer_positions), rows - n)
            zs.append(float32_of_bits(rec.hidden_answer[:take]))
            ids.append(rec.topk_ids[:take, -1])
            lps.append(rec.topk_logprobs[:take, -1])
            n += take
        if not n:
            return 0.0
        w, V = head.lm_head.weight, head.vocab_size
        with torch.no_grad():  # fp32 logits, one [rows x 8192] block of the head at a time (a 152k head in bf16)
            z = torch.from_numpy(np.concatenate(zs)).to(w.device, torch.float32)
            logits = torch.cat([z @ w[v0:min(V, v0 + 8192)].float().T for v0 in range(0, V, 8192)], dim=1)
            logp = torch.log_softmax(logits, dim=1).cpu().numpy()
        ids, lps = np.concatenate(ids), np.concatenate(lps)
        present = np.isfinite(lps)
        got = np.take_along_axis(logp, ids.astype(np.int64), axis=1)
        diff = float(np.abs(got - lps)[present].mean())
        if not diff < max_nats:
            raise JoinError(f"{self.reader.url}: --teacher-head {getattr(head, 'name', '')!r} gives log-probs "
                            f"{diff:.3f} nats away (mean, {int(present.sum())} entries) from the cache's final-head "
                            f"top-k at its stored states (> {max_nats}): not the head the cache was extracted with")
        return diff

    def get(self, sample_id: str) -> TeacherFeatures:
        from vlsi.cache_format.features import tensor_of_bits

        rec = self.reader.get(sample_id)  # KeyError when absent
        ids = torch.from_numpy(rec.input_ids.astype(np.int64))
        ap = torch.from_numpy(rec.answer_positions.astype(np.int64))
        return TeacherFeatures(rec.sample_id, rec.content_hash, ids, ap, ids[ap + 1], tensor_of_bits(rec.hidden_answer),
                               None if rec.hidden_question is None else tensor_of_bits(rec.hidden_question))


def _squash(s: str) -> str:
    return "".join(s.split())


def check_teacher_features(sample, feats: TeacherFeatures, teacher_tokenizer, *, d_teacher: int,
                           need_question: bool) -> None:
    """Raise ``BadSampleError`` (naming the sample and field) unless ``feats`` belong to ``sample`` (module doc)."""
    bad = sample.bad
    if feats.content_hash != sample.content_hash:
        raise bad(f"content_hash differs: dataset {sample.content_hash[:12]}..., teacher features "
                  f"{feats.content_hash[:12]}... (the sample changed since extraction)")
    ids = feats.input_ids.long()
    ap = feats.answer_positions.long()
    if ap.numel() == 0:
        raise bad("teacher features have no answer rows")
    if int(ap.min()) < 0 or int(ap.max()) + 1 >= ids.numel():
        raise bad(f"teacher answer_positions outside the teacher sequence of {ids.numel()} tokens")
    if not torch.equal(feats.answer_ids.long(), ids[ap + 1]):
        raise bad("teacher answer_ids are not input_ids[answer_positions + 1]")
    if tuple(feats.z_answer.shape) != (ap.numel(), d_teacher):
        raise bad(f"teacher z_answer has shape {tuple(feats.z_answer.shape)}, expected [{ap.numel()}, {d_teacher}]")
    if need_question:
        zq = feats.z_question
        nq = len(question_rows(ap.numpy(), ids.numel()))
        if zq is None:
            raise bad("no teacher question features (the regulariser needs --hidden-states all)")
        if tuple(zq.shape) != (nq, d_teacher):
            raise bad(f"teacher z_question has shape {tuple(zq.shape)}, expected [{nq}, {d_teacher}]")
    decoded = teacher_tokenizer.decode(feats.answer_ids.tolist(), skip_special_tokens=True)
    want = "".join(t.text for t in sample.turns if t.role == "assistant")
    a, b = _squash(decoded), _squash(want)
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise bad(f"teacher answer ids decode to {decoded[:40]!r}, not the sample's answers {want[:40]!r} "
                  f"(first difference at non-space character {at}): wrong tokenizer or sample")


def check_teacher_head(features_fp: dict, head_fp: dict, *, where: str = "features") -> None:
    """Refuse a ``--teacher-head`` whose fingerprint differs from the features' teacher, naming the fields."""
    diffs = [f for f in FINGERPRINT_FIELDS if features_fp.get(f) != head_fp.get(f)]
    if diffs:
        parts = "; ".join(f"{f} ({features_fp.get(f)!r} vs --teacher-head {head_fp.get(f)!r})"[:120] for f in diffs)
        raise JoinError(f"{where}: --teacher-head is not the teacher the features were extracted with: {parts}")


class GenRecalDataset(torch.utils.data.Dataset):
    """``ds[i] -> (Encoded (student), TeacherFeatures)`` checked per :func:`check_teacher_features`, or
    :class:`~vlsi.train.join.Rejected`; with ``source=None``, ``(Encoded, None)`` (the sft stage)."""

    def __init__(self, data, source: FeatureSource | None, bundle, teacher_tokenizer, *, d_teacher: int,
                 need_question: bool, max_length: int | None = None):
        self.data, self.source, self.bundle = data, source, bundle
        self.teacher_tokenizer, self.d_teacher, self.need_question = teacher_tokenizer, d_teacher, need_question
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        try:
            return self.load(i)
        except VlsiError as e:  # returned, not raised (see vlsi.train.join)
            return Rejected(e)

    def load(self, i: int):
        s = self.data[i]
        enc = encode_sample(s, self.bundle, max_length=self.max_length)
        if self.source is None:
            return enc, None
        try:
            feats = self.source.get(s.id)
        except KeyError:
            raise BadSampleError(s.id, "no teacher features for this sample", source=s.source) from None
        check_teacher_features(s, feats, self.teacher_tokenizer, d_teacher=self.d_teacher,
                               need_question=self.need_question)
        return enc, feats
