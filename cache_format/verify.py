"""verify_cache: read everything, check checksums, offsets and bookkeeping; never raises on corruption.

v1.1: every sample table (size + crc32c from its commit record, columns, rows and sums against the record, stored
id hashes against recomputed ones, unique ids) and the manifest's index (checksum, and row by row equal to the
sample tables of the segments it covers)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import layout
from .commit import visible_set
from .errors import CacheError
from .samples import TABLE_COLUMNS, IdLookup, SampleIndex, StringColumn, id_hashes, read_table
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
        vis = visible_set(loc, strict=False, problems=commit_problems)
    except CacheError as e:
        rep.add(str(e))
        return rep
    segs = vis.segments
    for p in commit_problems:
        rep.add(p)
    rep.n_segments = len(segs)
    digest = fp.digest()
    import zarr

    store = loc.zarr_store()
    tables_ok = [_check_sample_table(rep, loc, seg) for seg in segs]
    _check_duplicates(rep, [s for s, ok in zip(segs, tables_ok) if ok])
    if vis.index is not None:
        _check_index(rep, loc, vis, tables_ok)
    for seg, table_ok in zip(segs, tables_ok):
        where = f"part {seg.part} segment {seg.segment}"
        rep.n_samples += seg.n_samples
        if seg.fingerprint_digest != digest:
            rep.add(f"{where}: fingerprint digest differs from the cache root's")
        data: dict[str, np.ndarray | None] = {}
        if not table_ok:  # the arrays' checksums are still checked; per-sample checks need the table
            for name in layout.arrays_of(fp):
                rep.n_chunks += _check_chunks_only(rep, store, seg, name, where)
            continue
        ao = seg.answer_offsets()
        for name in layout.arrays_of(fp):
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
    for seg in segs:
        if seg.table is not None:
            seg.columns = None  # verify's own copies of the visible set: drop what it loaded
    orphans = _orphans(loc, {s.key for s in segs})
    if orphans:
        rep.notes.append(f"{len(orphans)} uncommitted or retired segment(s) ignored, e.g. {orphans[0]}")
    return rep


def _check_sample_table(rep: VerifyReport, loc: Location, seg) -> bool:
    """Load and check a v1.1 segment's sample table into ``seg.columns`` (v1.0: already there). False if bad."""
    where = f"part {seg.part} segment {seg.segment} sample table"
    if seg.columns is None:
        if seg.table is None:
            rep.add(f"{where}: missing (the commit record references none)")
            return False
        try:
            t = read_table(loc, seg.table, where)
        except CacheError as e:
            rep.add(str(e))
            return False
        if t.column_names != list(TABLE_COLUMNS):  # (v1.0 segments carry their columns from the record)
            rep.add(f"{where}: columns {t.column_names} != {list(TABLE_COLUMNS)}")
            return False
        nulls = [c for c in TABLE_COLUMNS if t.column(c).null_count]
        if nulls:
            rep.add(f"{where}: null values in {nulls}")
            return False
        seg.columns = t
    t = seg.columns
    try:
        idx = SampleIndex.from_tables([t], [seg.n_samples], content=False)
    except CacheError as e:
        rep.add(f"{where}: {e}")
        return False
    bad = idx.check_segments([seg])
    if bad:
        rep.add(f"{where}: {bad[0][1]}")
        return False
    if "id_hash" in t.column_names:  # v1.1: the stored lookup keys must be the ids' hashes
        ids = seg.sample_ids
        wrong = np.flatnonzero(t.column("id_hash").to_numpy() != id_hashes(ids))
        if wrong.size:
            rep.add(f"{where}: id_hash of {wrong.size} sample(s) differs from the id's hash, e.g. {ids[wrong[0]]!r}")
            return False
    return True


def _check_duplicates(rep: VerifyReport, segs: list) -> None:
    if not segs:
        return
    ids = StringColumn.concat([StringColumn.from_arrow(s.columns.column("sample_id").chunks) for s in segs])
    if all("id_hash" in s.columns.column_names for s in segs):
        lookup = IdLookup(ids, np.concatenate([s.columns.column("id_hash").to_numpy() for s in segs]))
    else:
        lookup = IdLookup(ids, id_hashes(list(ids)))
    starts = np.cumsum([0] + [s.n_samples for s in segs])
    for a, b in lookup.duplicates():
        sa, sb = (segs[int(np.searchsorted(starts, x, side="right")) - 1] for x in (a, b))
        rep.add(f"part {sb.part} segment {sb.segment}: duplicate sample id {ids[b]!r} (also in {sa.key})")


def _check_index(rep: VerifyReport, loc: Location, vis, tables_ok: list[bool]) -> None:
    """The manifest's index: its checksum, and every row equal to the sample tables of the listed segments."""
    from .reader import INDEX_COLUMNS, build_index

    where = f"manifest {vis.generation} index"
    try:
        got = read_table(loc, vis.index, where)
    except CacheError as e:
        rep.add(str(e))
        return
    listed = vis.segments[:vis.n_listed]
    if not all(tables_ok[:vis.n_listed]):
        rep.notes.append(f"{where}: not compared with the sample tables (some are bad)")
        return
    if got.column_names != list(INDEX_COLUMNS):
        rep.add(f"{where}: columns {got.column_names} != {list(INDEX_COLUMNS)}")
        return
    want = build_index(listed)
    for name in INDEX_COLUMNS:
        a, b = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        if a.type != b.type and not (str(a.type).replace("large_", "") == str(b.type).replace("large_", "")):
            rep.add(f"{where}: column {name} has type {a.type}, expected {b.type}")
            continue
        if not a.cast(b.type).equals(b):
            import pyarrow.compute as pc

            diff = pc.not_equal(a.cast(b.type), b)
            row = int(np.flatnonzero(diff.fill_null(True).to_numpy(zero_copy_only=False))[0]) if len(a) == len(b) else 0
            rep.add(f"{where}: column {name} differs from the sample tables (first at row {row})")


def _check_chunks_only(rep: VerifyReport, store, seg, name: str, where: str) -> int:
    import zarr

    try:
        arr = zarr.open_array(store, path=layout.array_path(seg.part, seg.segment, name), mode="r")
    except Exception as e:  # noqa: BLE001
        rep.add(f"{where} array {name}: cannot open ({_one_line(e)})")
        return 0
    C, n = arr.chunks[0], 0
    for c in range(-(-arr.shape[0] // C) if arr.shape[0] else 0):
        n += 1
        try:
            arr[c * C:min((c + 1) * C, arr.shape[0])]
        except Exception as e:  # noqa: BLE001
            rep.add(f"{where} array {name} chunk {c} (rows {c * C}..{min((c + 1) * C, arr.shape[0])}): {_one_line(e)}")
    return n


def _samples_in(seg, offs: np.ndarray, lo: int, hi: int) -> list[str]:
    first = int(np.searchsorted(offs, lo, side="right")) - 1
    last = int(np.searchsorted(offs, hi, side="left"))
    return seg.sample_ids[max(first, 0):max(last, first + 1)]


def _short(ids: list[str]) -> str:
    return ", ".join(repr(s) for s in ids[:3]) + (f" +{len(ids) - 3} more" if len(ids) > 3 else "")


def _check_content(rep: VerifyReport, where: str, seg, data: dict, fp: Fingerprint) -> None:
    io, ao = seg.input_offsets(), seg.answer_offsets()
    src = "sample table" if seg.table is not None else "commit record"
    if data["input_offsets"] is not None and not np.array_equal(data["input_offsets"], io):
        rep.add(f"{where} array input_offsets: disagrees with the {src}")
    if data["answer_offsets"] is not None and not np.array_equal(data["answer_offsets"], ao):
        rep.add(f"{where} array answer_offsets: disagrees with the {src}")
    pos, tk, lp, tail = data["answer_positions"], data["topk_ids"], data["topk_logprobs"], data["tail_logmass"]
    if tk is not None and lp is not None and tail is not None:  # check what readers return: the decoded arrays
        from .encodings import get_encoding

        try:
            tk, lp, _ = get_encoding(fp.value_encoding).decode(tk, lp, tail)
        except Exception as e:  # noqa: BLE001 - stored codes a decoder cannot follow
            rep.add(f"{where}: topk arrays do not decode with {fp.value_encoding}: {_one_line(e)}")
            return
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
        cnt = data.get(layout.COUNTS)
        if cnt is not None and a1 > a0 and (np.any(cnt[a0:a1].sum(-1, dtype=np.int64) != fp.samples_per_row)
                                            or (lp is not None and np.any((cnt[a0:a1] > 0)
                                                                          != np.isfinite(lp[a0:a1])))):
            rep.add(f"{where} sample {sid!r}: sample_counts do not sum to samples_per_row={fp.samples_per_row} "
                    f"or disagree with the present entries")
    if fp.hidden_states != "none":
        _check_hidden(rep, where, seg, data, fp)


def _check_hidden(rep: VerifyReport, where: str, seg, data: dict, fp: Fingerprint) -> None:
    """SPEC 5b: finite bf16 patterns; question_offsets a CSR whose per-sample counts are the question rows'."""
    from .features import n_question_rows, nonfinite

    ha, hq, qo, pos = (data.get(n) for n in (layout.HIDDEN_ANSWER, layout.HIDDEN_QUESTION, layout.QUESTION_OFFSETS,
                                              "answer_positions"))
    if ha is not None and nonfinite(ha):
        rep.add(f"{where} array hidden_answer: holds inf or NaN bf16 patterns")
    if hq is not None and nonfinite(hq):
        rep.add(f"{where} array hidden_question: holds inf or NaN bf16 patterns")
    if fp.hidden_states != "all" or qo is None:
        return
    n_q = hq.shape[0] if hq is not None else seg.arrays.get(layout.HIDDEN_QUESTION, {}).get("shape", [None])[0]
    if len(qo) != seg.n_samples + 1 or qo[0] != 0 or qo[-1] != n_q or np.any(np.diff(qo) < 0):
        rep.add(f"{where} array question_offsets: not a CSR over the {n_q} hidden_question rows")
        return
    if pos is None:
        return
    ao = seg.answer_offsets()
    for j, sid in enumerate(seg.sample_ids):
        want = n_question_rows(pos[int(ao[j]):int(ao[j + 1])], int(seg.n_tokens[j]))
        if int(qo[j + 1] - qo[j]) != want:
            rep.add(f"{where} sample {sid!r}: {int(qo[j + 1] - qo[j])} hidden_question rows, its question rows "
                    f"are {want}")


def _orphans(loc: Location, visible: set[str]) -> list[str]:
    segs = set()
    for rel in loc.find(layout.PARTS):
        bits = rel.split("/")
        if len(bits) >= 4 and bits[2].startswith("s"):
            segs.add(f"{bits[1]}/{bits[2]}")
    for rel in loc.find(layout.TABLES):  # a writer killed between its sample table and its commit record
        bits = rel.split("/")
        if len(bits) == 3 and bits[2].endswith(".parquet") and ".tmp-" not in bits[2]:
            segs.add(f"{bits[1]}/{bits[2][:-len('.parquet')]}")
    return sorted(segs - visible)
