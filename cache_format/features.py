"""Teacher hidden-state features (format 1.2 feature ``hidden-states-v1``, SPEC section 5b).

A feature cache stores, per sample, the teacher's final-layer POST-final-norm hidden states (what its LM head reads)
as bf16 bit patterns in uint16:

- ``hidden_answer``   uint16 [N_ans, d]: one row per answer position, aligned with ``answer_positions`` (the
  ``answer_offsets`` CSR);
- ``hidden_question`` uint16 [N_q, d] and ``question_offsets`` int64 [n + 1] (kind ``all`` only): one row per
  question row of the sample, :func:`question_rows` (the one definition, shared with training).

This module holds the names, the row definition, the bf16 <-> uint16 conversions (numpy; torch views where torch is
the caller's) and the per-record checks; ``schema``/``layout``/``writer``/``reader``/``verify`` call into it.
"""
from __future__ import annotations

import numpy as np

from .errors import SchemaError

HIDDEN_FEATURE = "hidden-states-v1"
#: fingerprint ``hidden_states`` values: "none" (absent), "answer" (answer rows), "all" (+ question rows)
HIDDEN_KINDS = ("none", "answer", "all")
HIDDEN_ANSWER = "hidden_answer"
HIDDEN_QUESTION = "hidden_question"
QUESTION_OFFSETS = "question_offsets"


def question_rows(answer_positions, length: int) -> np.ndarray:
    """Question rows of a sequence of ``length`` tokens: positions before the last answer row that are not answer
    rows, ascending (int64): the system/user text, image tokens and template scaffolding the answers are
    conditioned on. The one definition: the extractor's ``--hidden-states all`` rows, the cache's
    ``hidden_question`` rows and the student's question states in training all come from it."""
    ap = np.asarray(answer_positions, dtype=np.int64)
    if ap.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(ap.max()) >= length or int(ap.min()) < 0:
        raise ValueError(f"question_rows: answer positions {int(ap.min())}..{int(ap.max())} outside 0..{length - 1}")
    keep = np.ones(int(ap.max()), dtype=bool)
    keep[ap[ap < keep.size]] = False
    return np.nonzero(keep)[0].astype(np.int64)


def n_question_rows(answer_positions, length: int) -> int:
    """``len(question_rows(...))`` without building the rows: max(ap) minus the answer rows below it."""
    ap = np.asarray(answer_positions)
    return 0 if ap.size == 0 else int(ap.max()) - (int(ap.size) - 1)


# ---- bf16 bit patterns ----------------------------------------------------------------------------------------
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (what ``torch.Tensor.bfloat16`` does). NaN
    stays NaN (quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def float32_of_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exact."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bits_of_tensor(t) -> np.ndarray:
    """A torch tensor -> its bf16 bit patterns (uint16, host). A bf16 tensor is taken bit for bit; any other float
    dtype is rounded to bf16 first (on its device)."""
    import torch

    if t.dtype != torch.bfloat16:
        t = t.to(torch.bfloat16)
    return t.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def tensor_of_bits(bits: np.ndarray):
    """bf16 bit patterns (uint16) -> a torch bfloat16 tensor sharing nothing with ``bits``."""
    import torch

    a = np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16).copy()
    return torch.from_numpy(a).view(torch.bfloat16)


def nonfinite(bits: np.ndarray) -> bool:
    """True if any bf16 pattern is inf or NaN (exponent bits all ones)."""
    return bool(np.any((np.asarray(bits, np.uint16) & np.uint16(0x7F80)) == np.uint16(0x7F80)))


# ---- per-record checks ------------------------------------------------------------------------------------------
def check_fingerprint(kind: str, d: int) -> None:
    if kind not in HIDDEN_KINDS:
        raise SchemaError(f"fingerprint.hidden_states must be one of {HIDDEN_KINDS}, got {kind!r}")
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
        raise SchemaError(f"fingerprint.hidden_size must be an int >= 0, got {d!r}")
    if (kind != "none") != (d > 0):
        raise SchemaError("fingerprint.hidden_size must be > 0 exactly when hidden_states is 'answer' or 'all'")


def _bits(sid: str, name: str, x, rows: int, d: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.uint16:
        raise SchemaError(f"sample {sid!r}: field {name} has dtype {a.dtype}, expected uint16 (bf16 bit patterns; "
                          "vlsi.cache_format.features.bits_of_tensor / bf16_bits)")
    if a.shape != (rows, d):
        raise SchemaError(f"sample {sid!r}: field {name} has shape {a.shape}, expected {(rows, d)}")
    if nonfinite(a):
        raise SchemaError(f"sample {sid!r}: field {name} holds inf or NaN")
    return np.ascontiguousarray(a)


def validate_hidden(rec, fp, T: int, A: int):
    """``(hidden_answer, hidden_question)`` of ``rec`` checked against ``fp`` (normalised, or None where the
    fingerprint stores none). ``T``/``A``: the sample's input and answer lengths."""
    sid, kind, d = rec.sample_id, fp.hidden_states, fp.hidden_size
    ha, hq = rec.hidden_answer, rec.hidden_question
    if kind == "none":
        if ha is not None or hq is not None:
            raise SchemaError(f"sample {sid!r}: hidden-state fields given for a cache without hidden_states")
        return None, None
    if ha is None:
        raise SchemaError(f"sample {sid!r}: field hidden_answer is required (hidden_states={kind!r})")
    ha = _bits(sid, HIDDEN_ANSWER, ha, A, d)
    if kind == "answer":
        if hq is not None:
            raise SchemaError(f"sample {sid!r}: field hidden_question given for hidden_states='answer'")
        return ha, None
    if hq is None:
        raise SchemaError(f"sample {sid!r}: field hidden_question is required (hidden_states='all')")
    return ha, _bits(sid, HIDDEN_QUESTION, hq, n_question_rows(rec.answer_positions, T), d)
