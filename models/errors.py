"""Dataset and sample errors of vlsi.models; the root :class:`VlsiError` lives in :mod:`vlsi.common.errors`."""

from __future__ import annotations

from vlsi.common.errors import VlsiError, one_line

__all__ = ["VlsiError", "DatasetError", "BadSampleError"]


class DatasetError(VlsiError):
    """A whole dataset file is unusable (missing, unknown format, malformed top level, missing columns).

    Unlike :class:`BadSampleError` this is never skipped by ``--on-bad-sample skip``: there is no sample to skip.
    """


class BadSampleError(VlsiError):
    """One sample is unusable; ``--on-bad-sample`` decides whether it aborts the run or is skipped and reported.

    Attributes:
        sample_id: the sample's id, or ``None`` when it could not be read (e.g. a malformed JSON line).
        reason: what is wrong, one line, without the location (e.g. ``"image not found: img/a.png"``).
        source: where the sample came from (``"data.jsonl:12"``, ``"data.json[3]"``, ``"data.parquet[row 7]"``),
            or ``None``.
    """

    def __init__(self, sample_id: str | None, reason: str, *, source: str | None = None) -> None:
        self.sample_id = sample_id
        self.reason = one_line(reason)
        self.source = source
        where = f"{source}: " if source else ""
        who = f"sample {sample_id!r}" if sample_id is not None else "sample <unknown id>"
        super().__init__(f"{where}{who}: {self.reason}")

    def __reduce__(self):  # keep pickling (multiprocessing data loaders) working with the keyword-only field
        return (_rebuild_bad_sample, (self.sample_id, self.reason, self.source))


def _rebuild_bad_sample(sample_id, reason, source):
    return BadSampleError(sample_id, reason, source=source)
