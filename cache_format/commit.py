"""Commit records and manifests (SPEC section 7): which segments are visible, in which order."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import layout
from .errors import CacheError, CorruptCacheError, SchemaError
from .schema import FORMAT_NAME, FORMAT_VERSION


def crc32c_hex(data: bytes) -> str:
    import crc32c

    return str(crc32c.crc32c(data))


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(obj: dict) -> dict:
    """Return obj plus `checksum` = crc32c of its canonical JSON (detects flipped bytes in JSON objects)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": crc32c_hex(canonical(body))}


def unseal(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict) or "checksum" not in obj:
        raise CorruptCacheError(f"{where}: not a sealed record (no checksum)")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    if crc32c_hex(canonical(body)) != str(obj["checksum"]):
        raise CorruptCacheError(f"{where}: checksum mismatch (record corrupted)")
    return body


@dataclass
class Segment:
    """One committed segment: its samples' bookkeeping (SPEC section 7 commit record)."""

    part: str
    segment: str
    sample_ids: list[str]
    content_hashes: list[str]
    n_tokens: np.ndarray  # int64 [n]
    n_answer: np.ndarray  # int64 [n]
    arrays: dict = field(default_factory=dict)
    fingerprint_digest: str = ""

    @property
    def key(self) -> str:
        return f"{self.part}/{self.segment}"

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    def input_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_tokens)]).astype(np.int64)

    def answer_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_answer)]).astype(np.int64)

    def to_record(self) -> dict:
        return seal({
            "format": FORMAT_NAME, "format_version": list(FORMAT_VERSION),
            "part": self.part, "segment": self.segment, "fingerprint_digest": self.fingerprint_digest,
            "n_samples": self.n_samples, "n_input_tokens": int(self.n_tokens.sum()),
            "n_answer": int(self.n_answer.sum()), "arrays": self.arrays,
            "samples": {"sample_id": list(self.sample_ids), "content_hash": list(self.content_hashes),
                        "n_tokens": [int(x) for x in self.n_tokens], "n_answer": [int(x) for x in self.n_answer]},
        })

    @classmethod
    def from_record(cls, obj: Any, where: str) -> "Segment":
        body = unseal(obj, where)
        try:
            if body["format"] != FORMAT_NAME:
                raise SchemaError(f"{where}: format {body['format']!r} is not {FORMAT_NAME!r}")
            if int(body["format_version"][0]) > FORMAT_VERSION[0]:
                raise SchemaError(f"{where}: commit record version {body['format_version']} is newer than "
                                  f"this reader ({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]})")
            s = body["samples"]
            seg = cls(body["part"], body["segment"], list(s["sample_id"]), list(s["content_hash"]),
                      np.asarray(s["n_tokens"], dtype=np.int64), np.asarray(s["n_answer"], dtype=np.int64),
                      dict(body["arrays"]), str(body["fingerprint_digest"]))
            n = body["n_samples"]
            lens = {len(seg.sample_ids), len(seg.content_hashes), len(seg.n_tokens), len(seg.n_answer)}
            if lens != {n} or int(seg.n_tokens.sum()) != body["n_input_tokens"] \
                    or int(seg.n_answer.sum()) != body["n_answer"]:
                raise CorruptCacheError(f"{where}: sample bookkeeping does not add up")
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptCacheError(f"{where}: malformed commit record ({type(e).__name__}: {e})") from None
        return seg


def write_commit(loc, seg: Segment) -> None:
    """The commit point: after this object exists the segment is visible."""
    loc.write_json(layout.commit_path(seg.part, seg.segment), seg.to_record())


def read_commits(loc, *, strict: bool = True, problems: list[str] | None = None) -> list[Segment]:
    """All committed segments (commit records), sorted by (part, segment)."""
    out = []
    for rel in loc.find(layout.COMMITS):
        if not rel.endswith(".json") or ".tmp-" in rel:
            continue  # a local writer killed between write and rename leaves *.tmp-* garbage: ignore it
        try:
            out.append(Segment.from_record(loc.read_json(rel), f"{loc.url}: {rel}"))
        except CacheError as e:
            if strict:
                raise
            if problems is not None:
                problems.append(str(e))
    out.sort(key=lambda s: (s.part, s.segment))
    return out


def latest_manifest(loc) -> tuple[int, dict | None]:
    """(generation, manifest body) of the newest manifest, or (0, None)."""
    gens = []
    for rel in loc.find(layout.MANIFESTS):
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            gens.append((int(name[:-5]), rel))
    if not gens:
        return 0, None
    gen, rel = max(gens)
    return gen, unseal(loc.read_json(rel), f"{loc.url}: {rel}")


def write_manifest(loc, gen: int, segments: list[Segment], retired: list[str], index: str | None) -> None:
    body = {"format": FORMAT_NAME, "format_version": list(FORMAT_VERSION), "generation": gen,
            "segments": [s.to_record() for s in segments], "retired": sorted(set(retired)), "index": index}
    loc.write_json(f"{layout.MANIFESTS}/{gen:08d}.json", seal(body))


def visible_segments(loc, *, strict: bool = True, problems: list[str] | None = None) -> tuple[int, list[Segment]]:
    """The visible set (SPEC section 7): manifest segments, then committed ones neither listed nor retired."""
    loc.invalidate()  # object-store filesystems cache listings; other processes may have committed since
    gen, man = latest_manifest(loc)
    listed: list[Segment] = []
    hidden: set[str] = set()
    if man is not None:
        for i, rec in enumerate(man["segments"]):
            listed.append(Segment.from_record(rec, f"{loc.url}: manifest {gen} segment {i}"))
        hidden = {s.key for s in listed} | set(man["retired"])
    extra = [s for s in read_commits(loc, strict=strict, problems=problems) if s.key not in hidden]
    return gen, listed + extra
