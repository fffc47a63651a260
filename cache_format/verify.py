"""verify_cache: read everything, check checksums, offsets and bookkeeping; never raises on corruption."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import layout
from .commit import visible_segments
from .errors import CacheError
from .schema import Fingerprint
from .store import Location, _one_line
from .writer import read_root


@dataclass
class VerifyReport:
    """ok is True when no problem was found. Each problem is one line naming part/segment/array/chunk/sample."""

    url: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_samples: int = 0
    n_segments: int = 0
    n_chunks: int = 0

    def add(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    def to_dict(self) -> dict:
        return {"url": self.url, "ok": self.ok, "problems": self.problems, "notes": self.notes,
                "n_samples": self.n_samples, "n_segments": self.n_segments, "n_chunks": self.n_chunks}


def verify_cache(url: str, *, storage_options: dict | None = None) -> VerifyReport:
    """Check the root metadata, every commit record, every inner chunk's crc32c, CSR offsets, sample ranges,
    and duplicate ids. Problems are collected (never raised) so one run names every bad part/chunk/sample."""
    rep = VerifyReport(url)
    try:
        loc = Location(url, storage_options, read_only=True)
        attrs = read_root(loc)
        fp = Fingerprint.from_dict(attrs["fingerprint"])
        commit_problems: list[str] = []
        _, segs = visible_segments(loc, strict=False, problems=commit_problems)
    except CacheError as e:
        rep.add(str(e))
        return rep
    for p in commit_problems:
        rep.add(p)
    rep.n_segments = len(segs)
    digest = fp.digest()
    seen: dict[str, str] = {}
    import zarr

    store = loc.zarr_store()
    for seg in segs:
        where = f"part {seg.part} segment {seg.segment}"
        rep.n_samples += seg.n_samples
        if seg.fingerprint_digest != digest:
            rep.add(f"{where}: fingerprint digest differs from the cache root's")
        for sid in seg.sample_ids:
            if sid in seen:
                rep.add(f"{where}: duplicate sample id {sid!r} (also in {seen[sid]})")
            else:
                seen[sid] = seg.key
        data: dict[str, np.ndarray | None] = {}
        ao = seg.answer_offsets()
        for name in layout.ARRAYS:
            data[name] = None
            try:
                arr = zarr.open_array(store, path=layout.array_path(seg.part, seg.segment, name), mode="r")
            except Exception as e:  # noqa: BLE001
                rep.add(f"{where} array {name}: cannot open ({_one_line(e)})")
                continue
            if list(arr.shape) != seg.arrays.get(name, {}).get("shape"):
                rep.add(f"{where} array {name}: shape {list(arr.shape)} != committed {seg.arrays.get(name)}")
                continue
            C = arr.chunks[0]
            blocks, bad = [], False
            # read chunk by chunk so a failure names the chunk and the samples it holds
            for c in range(-(-arr.shape[0] // C) if arr.shape[0] else 0):
                lo, hi = c * C, min((c + 1) * C, arr.shape[0])
                rep.n_chunks += 1
                try:
                    blocks.append(np.asarray(arr[lo:hi]))
                except Exception as e:  # noqa: BLE001
                    bad = True
                    offs = seg.input_offsets() if name == "input_ids" else ao if name in layout.ANSWER_AXIS else None
                    ids = _samples_in(seg, offs, lo, hi) if offs is not None else seg.sample_ids[max(lo - 1, 0):hi]
                    rep.add(f"{where} array {name} chunk {c} (rows {lo}..{hi}, samples {_short(ids)}): {_one_line(e)}")
            if not bad:
                data[name] = np.concatenate(blocks) if blocks else np.zeros(arr.shape, arr.dtype)
        _check_content(rep, where, seg, data, fp)
    orphans = _orphans(loc, {s.key for s in segs})
    if orphans:
        rep.notes.append(f"{len(orphans)} uncommitted or retired segment(s) ignored, e.g. {orphans[0]}")
    return rep


def _samples_in(seg, offs: np.ndarray, lo: int, hi: int) -> list[str]:
    first = int(np.searchsorted(offs, lo, side="right")) - 1
    last = int(np.searchsorted(offs, hi, side="left"))
    return seg.sample_ids[max(first, 0):max(last, first + 1)]


def _short(ids: list[str]) -> str:
    return ", ".join(repr(s) for s in ids[:3]) + (f" +{len(ids) - 3} more" if len(ids) > 3 else "")


def _check_content(rep: VerifyReport, where: str, seg, data: dict, fp: Fingerprint) -> None:
    io, ao = seg.input_offsets(), seg.answer_offsets()
    if data["input_offsets"] is not None and not np.array_equal(data["input_offsets"], io):
        rep.add(f"{where} array input_offsets: disagrees with the commit record")
    if data["answer_offsets"] is not None and not np.array_equal(data["answer_offsets"], ao):
        rep.add(f"{where} array answer_offsets: disagrees with the commit record")
    pos, tk, lp, tail = data["answer_positions"], data["topk_ids"], data["topk_logprobs"], data["tail_logmass"]
    for j, sid in enumerate(seg.sample_ids):
        T = int(seg.n_tokens[j])
        a0, a1 = int(ao[j]), int(ao[j + 1])
        if pos is not None and a1 > a0:
            p = pos[a0:a1]
            if p[0] < 0 or p[-1] >= T - 1 or np.any(np.diff(p) <= 0):
                rep.add(f"{where} sample {sid!r}: answer_positions not strictly increasing in [0, T-1)")
        if tk is not None and a1 > a0 and (tk[a0:a1].min() < 0 or tk[a0:a1].max() >= fp.vocab_size):
            rep.add(f"{where} sample {sid!r}: topk_ids outside [0, vocab_size)")
        if lp is not None and a1 > a0 and np.isnan(lp[a0:a1]).any():
            rep.add(f"{where} sample {sid!r}: topk_logprobs contain NaN")
        if tail is not None and a1 > a0 and np.isnan(tail[a0:a1]).any():
            rep.add(f"{where} sample {sid!r}: tail_logmass contains NaN")


def _orphans(loc: Location, visible: set[str]) -> list[str]:
    segs = set()
    for rel in loc.find(layout.PARTS):
        bits = rel.split("/")
        if len(bits) >= 4 and bits[2].startswith("s"):
            segs.add(f"{bits[1]}/{bits[2]}")
    return sorted(segs - visible)
