"""Join the teacher cache with the dataset and the student's tokenization; refuse anything misaligned.

What must agree (docs/architecture.md "Rules of thumb"):

1. the cache's tokenizer fingerprint (``tokenizer_hash``, real ``vocab_size``) and the student's tokenizer
   (:func:`check_student_fingerprint`, whole run refused before training, naming the differing fields);
2. per sample, when it is LOADED (:class:`JoinedDataset`): the sample id is in the cache, the dataset's content
   hash equals the cached one, and the student's encoding reproduces the cached ``input_ids`` and
   ``answer_positions`` exactly (:func:`check_alignment`). Start-up reads no sample: the dataset is an index
   (:mod:`vlsi.models.dataset`). ``--verify-join full`` adds one explicit pass over every sample before training
   (:func:`verify_all`, with a progress bar).

A sample that fails never reaches a loss: the dataset returns a :class:`Rejected` marker instead, which the
collate function drops and hands to the main process; there ``--on-bad-sample error`` stops naming the sample,
``skip`` reports it (``ODIR/bad_samples.jsonl``). A skipped sample is not replaced: its micro-batch trains on the
others (the loss is normalised by the answer rows actually present), and a micro-batch left empty is replaced by
the next one of the permutation, so a resumed run skips exactly the same samples.

The cache reader is opened lazily in each DataLoader worker (readers hold thread pools and fsspec handles that do
not pickle); the workers' ``prefetch_factor`` is the read-ahead that keeps the GPU from waiting on the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlsi.cache_format import CacheError, open_cache
from vlsi.models.data import BadSamplePolicy
from vlsi.models.encoding import Batch, Encoded, collate, encode_sample
from vlsi.models.errors import BadSampleError, VlsiError
from vlsi.cache_format.compat import tokenizer_hash

from .losses import TeacherTargets

__all__ = ["JoinError", "check_student_fingerprint", "check_alignment", "JoinedDataset", "Rejected", "verify_all",
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
        raise JoinError(f"{where}: the student's tokenizer does not match the cache's fingerprint: {fields}; "
                        "VLsI needs one tokenizer for teacher and student: for a pair with different tokenizers, "
                        "use vlsi-train --method genrecal")


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


@dataclass
class Rejected:
    """What :class:`JoinedDataset` returns for a sample that must not train: the error, and whether it is about
    the sample (``BadSampleError``: the policy decides) or the whole run (a cache that cannot be read)."""

    error: VlsiError

    @property
    def fatal(self) -> bool:
        return not isinstance(self.error, BadSampleError)


def targets_of(rec) -> TeacherTargets:
    """A cache record's teacher arrays as torch tensors ([A, L, k] ids/logprobs, [A, L] tail)."""
    return TeacherTargets(
        torch.from_numpy(np.ascontiguousarray(rec.topk_ids, dtype=np.int32)),
        torch.from_numpy(np.ascontiguousarray(rec.topk_logprobs, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(rec.tail_logmass, dtype=np.float32)),
        None if rec.sample_counts is None else torch.from_numpy(np.ascontiguousarray(rec.sample_counts, np.int32)),
    )


class JoinedDataset(torch.utils.data.Dataset):
    """``ds[i] -> (Encoded, TeacherTargets)`` for sample ``i`` of ``data`` (a :class:`vlsi.models.dataset.Dataset`),
    ``(Encoded, None)`` without a cache (stages that need no teacher), or :class:`Rejected` for a sample that fails
    a check (module doc). Checked on every load: cheap next to the encoding, and a cache changed under a running job
    is caught."""

    def __init__(self, data, cache_url: str | None, bundle, *, storage_options: dict | None = None,
                 max_length: int | None = None):
        self.data = data
        self.cache_url = cache_url
        self.storage_options = storage_options
        self.bundle = bundle
        self.max_length = max_length
        self._reader = None

    def __len__(self) -> int:
        return len(self.data)

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
        try:
            return self.load(i)
        except VlsiError as e:  # returned, not raised: a worker's exception would lose its type and message
            return Rejected(e)

    def load(self, i: int):
        """Sample ``i`` encoded and checked against the cache; raises BadSampleError / JoinError."""
        s = self.data[i]
        enc = encode_sample(s, self.bundle, max_length=self.max_length)
        if self.cache_url is None:
            return enc, None
        try:
            rec = self.reader.get(s.id)
        except KeyError:
            raise BadSampleError(s.id, f"not in the cache {self.cache_url}", source=s.source) from None
        except CacheError as e:
            raise JoinError(f"{self.cache_url}: reading sample {s.id!r} failed: {e}") from None
        if rec.content_hash != s.content_hash:
            raise BadSampleError(s.id, f"content_hash differs: dataset {s.content_hash[:12]}..., cache "
                                       f"{rec.content_hash[:12]}... (the sample changed since extraction)",
                                 source=s.source)
        check_alignment(enc, rec.input_ids, rec.answer_positions)
        return enc, targets_of(rec)


def verify_all(dataset: JoinedDataset, policy: BadSamplePolicy, *, progress: bool = False) -> None:
    """``--verify-join full``: load and check every sample once before training (one pass, with a progress bar)."""
    it = range(len(dataset))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="verify join", unit="sample", leave=False)
    for i in it:
        item = dataset[i]
        if isinstance(item, Rejected):
            if item.fatal:
                raise item.error
            policy.handle(item.error)


def collate_joined(items: list, pad_id: int) -> tuple[Batch | None, TeacherTargets | None, list]:
    """Batch the accepted encodings and concatenate their teacher rows in ``forward_hidden``'s row order (the
    targets' own ``cat``: top-k targets, or GenRecal's per-sample features); the rejected items come back as the third element (the batch is ``None`` when none is left)."""
    rejected = [x for x in items if isinstance(x, Rejected)]
    items = [x for x in items if not isinstance(x, Rejected)]
    if not items:
        return None, None, rejected
    batch = collate([e for e, _ in items], pad_id)
    if items[0][1] is None:
        return batch, None, rejected
    return batch, type(items[0][1]).cat([t for _, t in items]), rejected  # TeacherTargets, or GenRecal's features
