"""Fingerprint and sample-record dataclasses: the code mirror of SPEC sections 2, 4 and 9."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .encodings import ENCODINGS_FEATURE, canonical_name, get_encoding
from .errors import SchemaError
from .features import HIDDEN_FEATURE, check_fingerprint as _check_hidden_fp, validate_hidden

FORMAT_NAME = "vlsi-teacher-cache"
FORMAT_VERSION = (1, 2)
#: features of the 1.2 fingerprint (SPEC section 3): each is listed in `required` only by a cache that uses it, so a
#: 1.2 cache that uses none of them stays readable by 1.1 readers. Later 1.2 features (e.g. teacher hidden-state
#: arrays) add their own name here and to `Fingerprint.features`; features never share a name.
SAMPLED_FEATURE = "sampled-targets-v1"
DERIVED_FEATURE = "derived-caches-v1"
ENCODED_FEATURE = ENCODINGS_FEATURE
#: features a reader of this version understands (SPEC section 3, `required`)
KNOWN_FEATURES = frozenset({"csr-segments-v1", "sample-tables-v1", ENCODED_FEATURE, SAMPLED_FEATURE, DERIVED_FEATURE,
                            HIDDEN_FEATURE})
#: the base of the root's `required` list a writer of each version writes (1.2 adds the fingerprint's features)
REQUIRED_BY_VERSION = {(1, 0): ("csr-segments-v1",), (1, 1): ("csr-segments-v1", "sample-tables-v1"),
                       (1, 2): ("csr-segments-v1", "sample-tables-v1")}
REQUIRED_FEATURES = REQUIRED_BY_VERSION[FORMAT_VERSION]
TARGETS = ("topk", "sampled")
#: fingerprint keys added by 1.2, with the value that means "absent" (written only when different, so the
#: fingerprints, digests and commit records of 1.0/1.1 caches are unchanged)
OPTIONAL_KEYS = {"targets": "topk", "samples_per_row": 0, "derived_from": None, "hidden_states": "none",
                 "hidden_size": 0}


@dataclass(frozen=True)
class Fingerprint:
    """Identity of everything that shaped the cached numbers (SPEC section 4)."""

    teacher: dict
    """name, revision, config_hash, family, num_layers, hidden_size, ... (str -> JSON)."""
    verbalizers: dict
    """hash (checkpoint hash), kind, layers."""
    target_layers: tuple[int, ...]
    """ascending unique 0-based decoder-layer indices; the final head is NOT listed (it is the last row)."""
    tokenizer_hash: str
    processor: dict
    """processor settings that change image-token counts."""
    vocab_size: int
    """real vocabulary size (len(tokenizer)); stored top-k ids are < vocab_size."""
    padded_vocab_size: int
    top_k: int
    value_encoding: str = "fp16-logprob"
    temperature: float = 1.0
    tool_version: str = ""
    created_at: str = ""
    targets: str = "topk"
    """(1.2) "topk": the k most probable tokens; "sampled": the distinct tokens of `samples_per_row` draws with
    replacement from the teacher's distribution, with their draw counts (array `sample_counts`)."""
    samples_per_row: int = 0
    """(1.2) draws per row for targets="sampled" (0 otherwise); `top_k` is then the stored width (<= draws)."""
    derived_from: dict | None = None
    """(1.2) for a cache made by `vlsi-cache derive`: the source's fingerprint digest and the derivation."""
    hidden_states: str = "none"
    """(1.2, feature hidden-states-v1) "answer": the teacher's post-final-norm hidden states at the answer rows
    (array `hidden_answer`); "all": also at the question rows (`hidden_question`, `question_offsets`)."""
    hidden_size: int = 0
    """(1.2) d of the stored hidden states (> 0 exactly when hidden_states is not "none")."""

    def __post_init__(self) -> None:
        tl = tuple(int(x) for x in self.target_layers)
        object.__setattr__(self, "target_layers", tl)
        if any(b <= a for a, b in zip(tl, tl[1:])) or any(x < 0 for x in tl):
            raise SchemaError(f"fingerprint.target_layers must be ascending unique non-negative ints, got {list(tl)}")
        for name in ("teacher", "verbalizers", "processor"):
            if not isinstance(getattr(self, name), dict):
                raise SchemaError(f"fingerprint.{name} must be a dict, got {type(getattr(self, name)).__name__}")
        for name in ("vocab_size", "padded_vocab_size", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SchemaError(f"fingerprint.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.padded_vocab_size < self.vocab_size:
            raise SchemaError(
                f"fingerprint.padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.top_k > self.vocab_size:
            raise SchemaError(f"fingerprint.top_k ({self.top_k}) > vocab_size ({self.vocab_size})")
        object.__setattr__(self, "value_encoding", canonical_name(self.value_encoding))
        get_encoding(self.value_encoding)
        if self.targets not in TARGETS:
            raise SchemaError(f"fingerprint.targets must be one of {TARGETS}, got {self.targets!r}")
        spr = self.samples_per_row
        if isinstance(spr, bool) or not isinstance(spr, (int, np.integer)) or spr < 0:
            raise SchemaError(f"fingerprint.samples_per_row must be an int >= 0, got {spr!r}")
        object.__setattr__(self, "samples_per_row", int(spr))
        if (self.targets == "sampled") != (self.samples_per_row > 0):
            raise SchemaError("fingerprint.samples_per_row must be > 0 exactly when targets is 'sampled'")
        if self.targets == "sampled" and not (self.top_k <= self.samples_per_row <= 255):
            raise SchemaError(f"fingerprint: sampled targets need top_k ({self.top_k}) <= samples_per_row "
                              f"({self.samples_per_row}) <= 255")
        if self.derived_from is not None and not isinstance(self.derived_from, dict):
            raise SchemaError("fingerprint.derived_from must be an object or absent")
        _check_hidden_fp(self.hidden_states, self.hidden_size)
        object.__setattr__(self, "hidden_size", int(self.hidden_size))
        object.__setattr__(self, "temperature", float(self.temperature))
        if not self.temperature > 0:
            raise SchemaError(f"fingerprint.temperature must be > 0, got {self.temperature}")
        try:  # must survive a JSON round trip unchanged
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SchemaError(f"fingerprint is not JSON-serialisable: {e}") from None

    @property
    def n_layers(self) -> int:
        """Rows of the layer axis: target layers + the final head."""
        return len(self.target_layers) + 1

    @property
    def layer_names(self) -> list[str]:
        return [str(x) for x in self.target_layers] + ["final"]

    @property
    def features(self) -> tuple[str, ...]:
        """The 1.2 features (SPEC section 3) this fingerprint uses: what a cache with it lists in `required`."""
        out = []
        if get_encoding(self.value_encoding).feature:
            out.append(get_encoding(self.value_encoding).feature)
        if self.targets == "sampled":
            out.append(SAMPLED_FEATURE)
        if self.derived_from is not None:
            out.append(DERIVED_FEATURE)
        if self.hidden_states != "none":
            out.append(HIDDEN_FEATURE)
        return tuple(out)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["target_layers"] = list(self.target_layers)
        for k, absent in OPTIONAL_KEYS.items():  # 1.2 keys only when used: older fingerprints stay byte-identical
            if d[k] == absent:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Fingerprint":
        if not isinstance(d, dict):
            raise SchemaError(f"fingerprint must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SchemaError(f"fingerprint has unknown keys {unknown}")
        missing = sorted(names - set(d) - set(OPTIONAL_KEYS))
        if missing:
            raise SchemaError(f"fingerprint is missing keys {missing}")
        return cls(**d)

    def digest(self) -> str:
        """sha256 over the fields that must match for two caches to mix (not created_at/tool_version)."""
        d = self.to_dict()
        for k in _VOLATILE:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_VOLATILE = ("created_at", "tool_version")


@dataclass(frozen=True)
class FieldDiff:
    """One differing fingerprint field; nested dict keys are dotted (`teacher.config_hash`)."""

    field: str
    cache_value: Any
    given_value: Any

    def __str__(self) -> str:
        return f"{self.field}: cache={self.cache_value!r} given={self.given_value!r}"


_MISSING = "<missing>"


def _diff_values(prefix: str, a: Any, b: Any, out: list[FieldDiff]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff_values(f"{prefix}.{k}", a.get(k, _MISSING), b.get(k, _MISSING), out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if list(a) != list(b):
            out.append(FieldDiff(prefix, list(a), list(b)))
    elif a != b:
        out.append(FieldDiff(prefix, a, b))


def diff_fingerprints(a: Fingerprint | dict, b: Fingerprint | dict, *,
                      ignore: tuple[str, ...] = _VOLATILE) -> list[FieldDiff]:
    """Field-by-field differences between `a` (the cache's) and `b` (the given one).

    `ignore` names top-level fields or dotted nested keys to skip. Returns [] when compatible.
    """
    da = a.to_dict() if isinstance(a, Fingerprint) else dict(a)
    db = b.to_dict() if isinstance(b, Fingerprint) else dict(b)
    out: list[FieldDiff] = []
    for k in sorted(set(da) | set(db)):
        _diff_values(k, da.get(k, _MISSING), db.get(k, _MISSING), out)
    ign = set(ignore)
    return [d for d in out if d.field not in ign and d.field.split(".")[0] not in ign]


@dataclass
class SampleRecord:
    """One sample's cached teacher signal (SPEC sections 2 and 5).

    Shapes: input_ids int32[T]; answer_positions int32[A] strictly increasing in [0, T-1);
    topk_ids int32[A, L, k]; topk_logprobs float32[A, L, k] (descending along k);
    tail_logmass float32[A, L]; L = len(target_layers) + 1, the final head last.
    Row a is the distribution over token input_ids[answer_positions[a] + 1]. An entry with log-prob -inf is
    absent (id 0; its mass is part of the tail). Sampled targets (fingerprint.targets == "sampled") add
    ``sample_counts`` uint8 [A, L, k]: the row's distinct drawn ids carry their draw counts (summing to
    samples_per_row), their log-probs the teacher's.
    """

    sample_id: str
    content_hash: str
    input_ids: np.ndarray
    answer_positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    sample_counts: np.ndarray | None = None
    """(sampled targets only) uint8 [A, L, k]: draws of each stored id (0 in absent slots)."""
    hidden_answer: np.ndarray | None = None
    """(hidden_states answer|all) uint16 [A, d]: bf16 bit patterns of the teacher's post-norm state at each answer
    row (`vlsi.cache_format.features`)."""
    hidden_question: np.ndarray | None = None
    """(hidden_states all) uint16 [Q, d] at the question rows (`features.question_rows`)."""
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def target_ids(self) -> np.ndarray:
        """The token each row predicts: input_ids[answer_positions + 1] (the alignment rule)."""
        return self.input_ids[self.answer_positions.astype(np.int64) + 1]

    def equals(self, other: "SampleRecord", *, atol: float = 0.0) -> bool:
        return (self.sample_id == other.sample_id and self.content_hash == other.content_hash
                and np.array_equal(self.input_ids, other.input_ids)
                and np.array_equal(self.answer_positions, other.answer_positions)
                and np.array_equal(self.topk_ids, other.topk_ids)
                and np.allclose(self.topk_logprobs, other.topk_logprobs, atol=atol, rtol=0, equal_nan=True)
                and np.allclose(self.tail_logmass, other.tail_logmass, atol=atol, rtol=0, equal_nan=True)
                and ((self.sample_counts is None and other.sample_counts is None)
                     or (self.sample_counts is not None and other.sample_counts is not None
                         and np.array_equal(self.sample_counts, other.sample_counts)))
                and all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
                        for x, y in ((self.hidden_answer, other.hidden_answer),
                                     (self.hidden_question, other.hidden_question))))


def _as(rec_id: str, name: str, x: Any, kind: str, dtype: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in kind:
        raise SchemaError(f"sample {rec_id!r}: field {name} has dtype {a.dtype}, expected {dtype}")
    if a.ndim != ndim:
        raise SchemaError(f"sample {rec_id!r}: field {name} has shape {a.shape}, expected {ndim} dims")
    if a.dtype.kind in "iu" and a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise SchemaError(f"sample {rec_id!r}: field {name} does not fit int32")
    return np.ascontiguousarray(a, dtype=dtype)


def validate_record(rec: SampleRecord, fp: Fingerprint) -> SampleRecord:
    """Check shapes, dtypes, ranges and alignment; return a normalised copy (int32/float32, contiguous)."""
    if not isinstance(rec, SampleRecord):
        raise SchemaError(f"append expects a SampleRecord, got {type(rec).__name__}")
    sid = rec.sample_id
    if not isinstance(sid, str) or not sid:
        raise SchemaError(f"sample id must be a non-empty str, got {sid!r}")
    if not isinstance(rec.content_hash, str):
        raise SchemaError(f"sample {sid!r}: field content_hash must be a str")
    ids = _as(sid, "input_ids", rec.input_ids, "iu", "int32", 1)
    pos = _as(sid, "answer_positions", rec.answer_positions, "iu", "int32", 1)
    tk = _as(sid, "topk_ids", rec.topk_ids, "iu", "int32", 3)
    lp = _as(sid, "topk_logprobs", rec.topk_logprobs, "f", "float32", 3)
    tail = _as(sid, "tail_logmass", rec.tail_logmass, "f", "float32", 2)
    T, A, L, k = len(ids), len(pos), fp.n_layers, fp.top_k
    for name, a, want in (("topk_ids", tk, (A, L, k)), ("topk_logprobs", lp, (A, L, k)), ("tail_logmass", tail, (A, L))):
        if a.shape != want:
            raise SchemaError(f"sample {sid!r}: field {name} has shape {a.shape}, expected {want} (A={A}, L={L}, k={k})")
    if T and ids.min() < 0:
        raise SchemaError(f"sample {sid!r}: field input_ids has negative ids")
    if A:
        if pos[0] < 0 or pos[-1] >= T - 1 or np.any(np.diff(pos) <= 0):
            raise SchemaError(f"sample {sid!r}: field answer_positions must be strictly increasing in [0, T-1={T - 1})")
        if tk.min() < 0 or tk.max() >= fp.vocab_size:
            raise SchemaError(f"sample {sid!r}: field topk_ids outside [0, vocab_size={fp.vocab_size})")
        if np.isnan(lp).any() or (lp > 1e-3).any():
            raise SchemaError(f"sample {sid!r}: field topk_logprobs must be log-probs (<= 0, not NaN)")
        if np.isnan(tail).any() or (tail > 1e-3).any():
            raise SchemaError(f"sample {sid!r}: field tail_logmass must be a log-mass (<= 0, not NaN)")
    counts = None
    if fp.targets == "sampled":
        if rec.sample_counts is None:
            raise SchemaError(f"sample {sid!r}: field sample_counts is required for sampled targets")
        counts = _as(sid, "sample_counts", rec.sample_counts, "iu", "int32", 3)
        if counts.shape != (A, L, k):
            raise SchemaError(f"sample {sid!r}: field sample_counts has shape {counts.shape}, expected {(A, L, k)}")
        if A and (counts.min() < 0 or np.any(counts.sum(-1) != fp.samples_per_row)
                  or np.any((counts > 0) != np.isfinite(lp))):
            raise SchemaError(f"sample {sid!r}: field sample_counts must be >= 0, sum to samples_per_row="
                              f"{fp.samples_per_row} per row, and be > 0 exactly where topk_logprobs is finite")
        counts = counts.astype(np.uint8)
    elif rec.sample_counts is not None:
        raise SchemaError(f"sample {sid!r}: field sample_counts given for a top-k cache")
    ha, hq = validate_hidden(rec, fp, T, A)
    return SampleRecord(sid, rec.content_hash, ids, pos, tk, lp, tail, counts, ha, hq)
