"""Join the teacher cache with the dataset and the student's tokenization; refuse anything misaligned.

What must agree before a single step trains (docs/architecture.md "Rules of thumb"):

1. the cache's tokenizer fingerprint (``tokenizer_hash``, real ``vocab_size``) and the student's tokenizer
   (:func:`check_student_fingerprint`, whole run refused, naming the differing fields);
2. per sample: the sample id is in the cache, the dataset's content hash equals the cached one, and the student's
   encoding reproduces the cached ``input_ids`` and ``answer_positions`` exactly (:func:`check_alignment`).
   ``--on-bad-sample error`` (default) stops naming the sample and field; ``skip`` leaves it out and reports it.

``verify="full"`` encodes every sample once before training (images included: image-token counts are part of the
ids); ``"lazy"`` checks only ids / hashes up front and the encoding when a sample is loaded, still before its
targets reach a loss (a mismatch then always raises: a fixed-size batch cannot skip).

:class:`JoinedDataset` is a map-style torch Dataset yielding ``(Encoded, TeacherTargets)`` per sample; the cache
reader is opened lazily in each DataLoader worker (readers hold thread pools and fsspec handles that do not
pickle), and the workers' ``prefetch_factor`` is the read-ahead that keeps the GPU from waiting on the cache.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vlsi.cache_format import CacheError, open_cache
from vlsi.models.data import BadSamplePolicy, BadSampleReport, read_dataset
from vlsi.models.encoding import Batch, Encoded, collate, encode_sample
from vlsi.models.errors import BadSampleError, VlsiError
from vlsi.cache_format.compat import tokenizer_hash

from .losses import TeacherTargets

__all__ = ["JoinError", "check_student_fingerprint", "check_alignment", "join_samples", "JoinedDataset",
           "collate_joined", "targets_of"]


class JoinError(VlsiError):
    """The cache does not fit the student or the dataset as a whole (one line naming the fields)."""


def check_student_fingerprint(reader, tokenizer, *, url: str | None = None) -> None:
    """Refuse a cache whose tokenizer (hash, real vocab size) differs from the student's.

    The hash is ``vlsi.cache_format.tokenizer_hash``, the one definition ``vlsi-extract`` writes into the fingerprint
    (through the teacher adapter's ``fingerprint()``).
    """
    fp = reader.fingerprint
    diffs = [(name, a, b) for name, a, b in (
        ("tokenizer_hash", fp.tokenizer_hash, tokenizer_hash(tokenizer)),
        ("vocab_size", fp.vocab_size, len(tokenizer)),
    ) if a != b]
    if diffs:
        where = url or getattr(reader, "url", "cache")
        fields = "; ".join(f"{f} (cache {_short(a)} vs student {_short(b)})" for f, a, b in diffs)
        raise JoinError(f"{where}: the student's tokenizer does not match the cache's fingerprint: {fields}")


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 24 else s[:21] + "..."


def check_alignment(enc: Encoded, input_ids: np.ndarray, answer_positions: np.ndarray) -> None:
    """Raise ``BadSampleError`` naming the field and first differing position when the student's encoding of a
    sample does not reproduce the cached ``input_ids`` / ``answer_positions``."""
    mine = enc.input_ids.numpy().astype(np.int64)
    theirs = np.asarray(input_ids).astype(np.int64)
    if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        n = min(len(mine), len(theirs))
        diff = np.nonzero(mine[:n] != theirs[:n])[0]
        at = int(diff[0]) if diff.size else n
        a = int(mine[at]) if at < len(mine) else None
        b = int(theirs[at]) if at < len(theirs) else None
        raise BadSampleError(enc.sample_id, f"input_ids differ from the cache at position {at} (student {a}, cache "
                                            f"{b}; lengths {len(mine)} vs {len(theirs)}): tokenizer/processor/template mismatch")
    mine_p = enc.answer_positions.numpy().astype(np.int64)
    theirs_p = np.asarray(answer_positions).astype(np.int64)
    if mine_p.shape != theirs_p.shape or not np.array_equal(mine_p, theirs_p):
        raise BadSampleError(enc.sample_id, f"answer_positions differ from the cache (student {len(mine_p)} rows "
                                            f"from {mine_p[:1].tolist()}, cache {len(theirs_p)} rows from "
                                            f"{theirs_p[:1].tolist()})")


def join_samples(
    data: str,
    reader,
    bundle,
    *,
    image_root: str | None = None,
    max_length: int | None = None,
    on_bad_sample: str = "error",
    verify: str = "full",
    report: BadSampleReport | None = None,
    progress: bool = False,
) -> tuple[list, BadSampleReport]:
    """Samples of ``data`` that the cache holds and that align with it, in dataset order, plus the skip report.

    Checks per sample, in order: in the cache; content hash equal; (``verify="full"``) student encoding ==
    cached input ids / answer positions. Raises ``BadSampleError`` on the first bad sample in ``error`` mode.
    ``reader=None`` (stages that need no teacher, e.g. plain SFT): only the student's encoding is checked.
    """
    policy = BadSamplePolicy(on_bad_sample, report if report is not None else BadSampleReport())
    if reader is not None:
        idx = reader.index
        cached_hash = dict(zip(idx.column("sample_id").to_pylist(), idx.column("content_hash").to_pylist()))
    out = []
    it = read_dataset(data, image_root=image_root, on_bad_sample=policy)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="join", unit="sample", leave=False)
    for s in it:
        try:
            if reader is None:
                if verify == "full":
                    encode_sample(s, bundle, max_length=max_length)
                out.append(s)
                continue
            h = cached_hash.get(s.id)
            if h is None:
                raise BadSampleError(s.id, f"not in the cache {getattr(reader, 'url', '')}".rstrip())
            if h != s.content_hash:
                raise BadSampleError(s.id, f"content_hash differs: dataset {s.content_hash[:12]}..., cache {h[:12]}... "
                                           "(the sample changed since extraction)")
            if verify == "full":
                enc = encode_sample(s, bundle, max_length=max_length)
                rec = reader.get(s.id)
                check_alignment(enc, rec.input_ids, rec.answer_positions)
        except BadSampleError as err:
            policy.handle(err)
            continue
        out.append(s)
    if not out:
        raise JoinError(f"{data}: no sample of the dataset is usable{' with the cache' if reader is not None else ''} "
                        f"({policy.report.count} skipped)")
    return out, policy.report


def targets_of(rec) -> TeacherTargets:
    """A cache record's teacher arrays as torch tensors ([A, L, k] ids/logprobs, [A, L] tail)."""
    return TeacherTargets(
        torch.from_numpy(np.ascontiguousarray(rec.topk_ids, dtype=np.int32)),
        torch.from_numpy(np.ascontiguousarray(rec.topk_logprobs, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(rec.tail_logmass, dtype=np.float32)),
    )


class JoinedDataset(torch.utils.data.Dataset):
    """``ds[i] -> (Encoded, TeacherTargets)`` for the i-th joined sample, or ``(Encoded, None)`` without a cache
    (stages that need no teacher); the alignment is checked on every load (cheap next to the encoding, and a cache
    changed under a running job is caught)."""

    def __init__(self, samples: Sequence, cache_url: str | None, bundle, *, storage_options: dict | None = None,
                 max_length: int | None = None):
        self.samples = list(samples)
        self.cache_url = cache_url
        self.storage_options = storage_options
        self.bundle = bundle
        self.max_length = max_length
        self._reader = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):  # the reader is per process
        d = dict(self.__dict__)
        d["_reader"] = None
        return d

    @property
    def reader(self):
        if self._reader is None:
            self._reader = open_cache(self.cache_url, storage_options=self.storage_options)
        return self._reader

    def __getitem__(self, i: int):
        s = self.samples[i]
        enc = encode_sample(s, self.bundle, max_length=self.max_length)
        if self.cache_url is None:
            return enc, None
        try:
            rec = self.reader.get(s.id)
        except KeyError:
            raise BadSampleError(s.id, f"not in the cache {self.cache_url}") from None
        except CacheError as e:
            raise JoinError(f"{self.cache_url}: reading sample {s.id!r} failed: {e}") from None
        check_alignment(enc, rec.input_ids, rec.answer_positions)
        return enc, targets_of(rec)


def collate_joined(items: list, pad_id: int) -> tuple[Batch, TeacherTargets | None]:
    """Batch the encodings and concatenate the teacher rows in the same order as ``forward_hidden``'s rows."""
    batch = collate([e for e, _ in items], pad_id)
    if items[0][1] is None:
        return batch, None
    return batch, TeacherTargets.cat([t for _, t in items])
