"""Dataset readers: LLaVA-style JSON / JSONL and Parquet with embedded image bytes -> :class:`Sample`.

Contracts (extraction, training and eval all rely on them):

* A :class:`Sample` holds the conversation as :class:`Turn` s (roles ``system`` / ``user`` / ``assistant``; texts keep
  the ``<image>`` placeholders) and the images as their **raw encoded file bytes**, in placeholder order. Images are
  read eagerly when the sample is yielded (the iterator itself is lazy, one sample at a time), so the content hash
  and the image processor see exactly the same bytes and a missing/unreadable file is caught before any model work.
* LLaVA convention: a sample with images but no ``<image>`` placeholder gets one ``"<image>\\n"`` per image
  prepended to its first user turn. The normalised text is what the sample holds and what is hashed, so the same
  sample written with or without explicit placeholders hashes the same.
* :func:`content_hash` is sha256 over a canonical, length-prefixed encoding of (turn roles + texts, each image's
  bytes), in order; ids and extra fields (``meta``) are not part of it. It is independent of the file format, so
  the same sample in JSON and in Parquet hashes the same.
* Bad samples (missing/unreadable image, placeholder/image count mismatch, placeholder in an answer, no assistant
  turn, unknown role, missing/empty/duplicate id, malformed JSON line) go through one :class:`BadSamplePolicy`:
  ``"error"`` raises :class:`~vlsi.models.errors.BadSampleError` (one line: file, sample id, reason), ``"skip"``
  records it in a :class:`BadSampleReport` and moves on. Later checks (e.g. over ``--max-length`` at encoding)
  reuse the same policy object. Whole-file problems raise :class:`~vlsi.models.errors.DatasetError` regardless.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from vlsi.models.errors import BadSampleError, DatasetError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "Turn",
    "Sample",
    "content_hash",
    "BadSampleEntry",
    "BadSampleReport",
    "BadSamplePolicy",
    "read_dataset",
    "write_llava_json",
]

IMAGE_PLACEHOLDER = "<image>"
"""The placeholder marking where an image goes in a turn's text (LLaVA convention)."""

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")
# LLaVA writes human/gpt; chat-style exports write user/assistant.
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
# Keys with a meaning in the LLaVA layout; every other key of a record goes to Sample.meta.
_RESERVED_KEYS = frozenset({"id", "image", "images", "conversations"})

_HASH_MAGIC = b"vlsi.sample.v1\n"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One conversation turn. ``text`` keeps the ``<image>`` placeholders as written in the data."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"Turn.role must be one of {_ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Turn.text must be str, got {type(self.text).__name__}")


def content_hash(turns: Iterable[Turn], images: Iterable[bytes]) -> str:
    """sha256 hex digest of a sample's content: turn roles + texts (UTF-8) and image bytes, in order.

    Canonical encoding (version 1): ``b"vlsi.sample.v1\\n"``, then u64-LE(number of turns), per turn
    u64-LE(len) + role bytes and u64-LE(len) + text bytes, then u64-LE(number of images), per image u64-LE(len) +
    bytes. Length prefixes make it unambiguous (no concatenation collisions); nothing machine-dependent enters it.
    """
    h = hashlib.sha256(_HASH_MAGIC)
    turns = list(turns)
    images = list(images)
    h.update(struct.pack("<Q", len(turns)))
    for turn in turns:
        for part in (turn.role.encode("utf-8"), turn.text.encode("utf-8")):
            h.update(struct.pack("<Q", len(part)))
            h.update(part)
    h.update(struct.pack("<Q", len(images)))
    for data in images:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Sample:
    """One training / eval sample.

    Attributes:
        id: unique (within its dataset) non-empty id.
        turns: the conversation, placeholders normalised (see module doc).
        images: raw encoded image file bytes (PNG/JPEG/...), in placeholder order.
        image_names: where each image came from (the path as written in the data, or the Parquet struct's
            ``path``); informational, not hashed.
        meta: every extra field of the record (e.g. ``category``, ``answer``, ``options``), for eval.
        source: location for error messages (``"data.jsonl:12"``), or ``None``.
    """

    id: str
    turns: list[Turn]
    images: list[bytes]
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @cached_property
    def content_hash(self) -> str:
        """See :func:`content_hash`; stable across runs, machines and file formats."""
        return content_hash(self.turns, self.images)

    @property
    def num_placeholders(self) -> int:
        return sum(t.text.count(IMAGE_PLACEHOLDER) for t in self.turns)

    def bad(self, reason: str) -> BadSampleError:
        """A :class:`BadSampleError` for this sample (id + source filled in), e.g. for the max-length check."""
        return BadSampleError(self.id, reason, source=self.source)

    def pil_images(self) -> list:
        """The images decoded as RGB ``PIL.Image`` s; raises :class:`BadSampleError` on unreadable bytes."""
        out = []
        for k, data in enumerate(self.images):
            try:
                out.append(_decode_image(data))
            except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
                name = self.image_names[k] if k < len(self.image_names) else f"image {k}"
                raise self.bad(f"unreadable image {name}: {exc}") from exc
        return out


def _decode_image(data: bytes):
    from PIL import Image  # lazy: keeps `import vlsi.models.data` light for CLIs

    img = Image.open(io.BytesIO(data))
    img.load()  # force a full decode now, so truncated files fail here and not inside a processor
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# bad-sample policy


@dataclass(frozen=True)
class BadSampleEntry:
    """One skipped sample: its id (``None`` if unreadable), the reason, and where it was."""

    id: str | None
    reason: str
    source: str | None = None


class BadSampleReport:
    """The samples skipped under ``--on-bad-sample skip``: ``.count``, ``.entries``, ``.write(path)`` (JSONL).
    A sample met again (a later epoch, a check repeated at load time) is recorded once."""

    def __init__(self) -> None:
        self.entries: list[BadSampleEntry] = []
        self._seen: set[BadSampleEntry] = set()

    def add(self, err: BadSampleError) -> bool:
        """Record ``err``; False when the same sample and reason were already recorded."""
        e = BadSampleEntry(err.sample_id, err.reason, err.source)
        if e in self._seen:
            return False
        self._seen.add(e)
        self.entries.append(e)
        return True

    @property
    def count(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str | None]:
        return [e.id for e in self.entries]

    def write(self, path: str | os.PathLike) -> Path:
        """Write one JSON object per skipped sample: ``{"id", "reason", "source"}``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for e in self.entries:
                f.write(json.dumps({"id": e.id, "reason": e.reason, "source": e.source}, ensure_ascii=False) + "\n")
        return path


class BadSamplePolicy:
    """What to do with a bad sample: ``mode="error"`` raises it, ``mode="skip"`` records it in ``report``.

    One object is shared by every check of a run (reading, encoding/max-length, ...) so the report is complete.
    """

    def __init__(self, mode: Literal["error", "skip"] = "error", report: BadSampleReport | None = None) -> None:
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.report = report if report is not None else BadSampleReport()

    def handle(self, err: BadSampleError) -> None:
        """Raise ``err`` (mode ``error``) or record it, log a one-line warning and return (mode ``skip``)."""
        if self.mode == "error":
            raise err
        if self.report.add(err):
            _log.warning("skipped bad sample: %s", err)

    def __repr__(self) -> str:
        return f"BadSamplePolicy(mode={self.mode!r}, skipped={self.report.count})"


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_dataset(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    on_bad_sample: Literal["error", "skip"] | BadSamplePolicy = "error",
    report: BadSampleReport | None = None,
    verify_images: bool = True,
    storage_options: dict | None = None,
) -> Iterator[Sample]:
    """Iterate the samples of a LLaVA-style ``.json`` (a list) / ``.jsonl`` file or a ``.parquet`` file, in file
    order, through its index (:func:`vlsi.models.dataset.open_dataset`: one sample in memory at a time).

    Records: ``id``; ``image`` (a path, a list of paths, or absent/null for text-only; in Parquet also a
    ``{bytes, path}`` struct or raw binary) or ``images`` (a list of those); ``conversations`` as a list of
    ``{from: human|gpt|user|assistant|system, value}`` (``role``/``content`` also accepted; in Parquet also a JSON
    string). Every other field goes to ``Sample.meta``. Relative image paths resolve against ``image_root``
    (default: the data file's folder); both may be fsspec URLs (``storage_options`` as for the cache).

    ``on_bad_sample``: ``"error"`` (raise :class:`BadSampleError` on the first bad sample), ``"skip"`` (record it in
    ``report`` and continue), or a :class:`BadSamplePolicy` to share with later checks. ``verify_images`` decodes
    every image once while reading (catches truncated files early; costs one decode per image).

    File-level problems (missing file, unknown extension, top level not a list, missing columns) raise
    :class:`DatasetError` immediately, at call time.
    """
    from .dataset import open_dataset

    if isinstance(on_bad_sample, BadSamplePolicy):
        if report is not None and report is not on_bad_sample.report:
            raise ValueError("pass either a BadSamplePolicy or a report, not a policy with a different report")
        policy = on_bad_sample
    else:
        policy = BadSamplePolicy(on_bad_sample, report)
    ds = open_dataset(path, image_root=image_root, storage_options=storage_options, verify_images=verify_images)
    return iter_samples(ds, policy)


def iter_samples(ds, policy: BadSamplePolicy) -> Iterator[Sample]:
    """The samples of ``ds`` in file order; bad ones (found while indexing or while loading) go to ``policy``."""
    bad = list(zip(ds.index.bad, ds.bad_entries))
    k = 0
    for i in range(len(ds)):
        pos = int(ds.index.pos[i])
        while k < len(bad) and bad[k][0][0] < pos:  # records that failed while indexing, at their place
            policy.handle(bad[k][1])
            k += 1
        try:
            sample = ds[i]
        except BadSampleError as err:
            policy.handle(err)
            continue
        yield sample
    for _, err in bad[k:]:
        policy.handle(err)


def check_record(record: Any, *, source: str) -> str:
    """Check a raw record without reading its images (id, conversations, the image field's shape); returns its id
    or raises :class:`BadSampleError`. What the dataset index checks once per record; the checks that need the
    images (found, readable, as many as placeholders) run when the sample is loaded."""
    sid = _record_id(record, source)

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sid, reason, source=source)

    _parse_turns(record.get("conversations"), bad)
    _image_refs(record, bad)
    return sid


def _record_id(record: Any, source: str) -> str:
    if not isinstance(record, dict):
        raise BadSampleError(None, f"record must be an object, got {type(record).__name__}", source=source)
    raw_id = record.get("id")
    if raw_id is None:
        raise BadSampleError(None, "missing id", source=source)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise BadSampleError(None, f"id must be a string or integer, got {type(raw_id).__name__}", source=source)
    sid = str(raw_id)  # LLaVA data mixes "000000033471" and 33471; ids are strings from here on
    if not sid.strip():
        raise BadSampleError(sid, "empty id", source=source)
    return sid


def to_sample(record: Any, *, source: str, files, verify_images: bool) -> Sample:
    """A :class:`Sample` from a raw record, its images read through ``files`` (relative paths resolve there)."""
    sid = _record_id(record, source)

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sid, reason, source=source)

    turns = _parse_turns(record.get("conversations"), bad)
    refs = _image_refs(record, bad)
    images, names = [], []
    for k, ref in enumerate(refs):
        data, name = _load_image(ref, k, files, bad)
        if verify_images:
            try:
                _decode_image(data)
            except Exception as exc:
                raise bad(f"unreadable image {name}: {exc}") from exc
        images.append(data)
        names.append(name)

    turns = _normalise_placeholders(turns, len(images), bad)
    meta = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    return Sample(id=sid, turns=turns, images=images, image_names=names, meta=meta, source=source)


def _parse_turns(conv: Any, bad) -> list[Turn]:
    if isinstance(conv, str):  # Parquet exports often store conversations as a JSON string
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError as exc:
            raise bad(f"conversations is not valid JSON: {exc}") from exc
    if conv is None:
        raise bad("missing conversations")
    if not isinstance(conv, list):
        raise bad(f"conversations must be a list, got {type(conv).__name__}")
    turns = []
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise bad(f"conversations[{j}] must be an object, got {type(msg).__name__}")
        who = msg.get("from", msg.get("role"))
        text = msg.get("value", msg.get("content"))
        role = _ROLE_ALIASES.get(who) if isinstance(who, str) else None
        if role is None:
            raise bad(f"conversations[{j}]: unknown role {who!r} (expected human/gpt, user/assistant or system)")
        if not isinstance(text, str):
            raise bad(f"conversations[{j}]: 'value' must be a string, got {type(text).__name__}")
        turns.append(Turn(role, text))
    if not any(t.role == "assistant" for t in turns):
        raise bad("no assistant turn")
    return turns


def _image_refs(record: dict, bad) -> list[Any]:
    if record.get("image") is not None and record.get("images") is not None:
        raise bad("both 'image' and 'images' are set")
    ref = record.get("image") if record.get("image") is not None else record.get("images")
    if ref is None:
        return []
    if isinstance(ref, list):
        return ref
    return [ref]


def _load_image(ref: Any, k: int, files, bad) -> tuple[bytes, str]:
    """(bytes, display name) of one image reference: a path, raw bytes, or a ``{bytes, path}`` struct."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref), f"<embedded image {k}>"
    if isinstance(ref, dict):  # HF datasets' Image feature: bytes embedded, or only a path
        data, p = ref.get("bytes"), ref.get("path")
        if data is not None:
            return bytes(data), p or f"<embedded image {k}>"
        ref = p
        if ref is None:
            raise bad(f"image {k}: struct has neither bytes nor path")
    if not isinstance(ref, str):
        raise bad(f"image {k}: expected a path, bytes or {{bytes, path}}, got {type(ref).__name__}")
    if not ref.strip():
        raise bad(f"image {k}: empty image path")
    full = files.join(ref)
    try:
        return files.read(ref), ref
    except FileNotFoundError:
        raise bad(f"image not found: {full}") from None
    except OSError as exc:
        raise bad(f"cannot read image {full}: {exc.strerror or exc}") from exc


def _normalise_placeholders(turns: list[Turn], n_images: int, bad) -> list[Turn]:
    for j, t in enumerate(turns):
        if t.role == "assistant" and IMAGE_PLACEHOLDER in t.text:
            raise bad(f"conversations[{j}]: {IMAGE_PLACEHOLDER} placeholder in an assistant turn")
    n_ph = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_ph == 0 and n_images > 0:
        # LLaVA convention: images without placeholders go before the first user turn's text.
        for j, t in enumerate(turns):
            if t.role == "user":
                turns = list(turns)
                turns[j] = Turn("user", (IMAGE_PLACEHOLDER + "\n") * n_images + t.text)
                return turns
        raise bad(f"{n_images} image(s) but no user turn to attach them to")
    if n_ph != n_images:
        raise bad(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)")
    return turns


# ---------------------------------------------------------------------------------------------------------------
# writing

_MAGIC_EXT = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
)


def _image_ext(data: bytes) -> str:
    for magic, ext in _MAGIC_EXT:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def write_llava_json(
    samples: Iterable[Sample], path: str | os.PathLike, *, image_dir: str | os.PathLike
) -> Path:
    """Write samples in the LLaVA layout (``.json`` list, or ``.jsonl`` by extension); returns ``path``.

    Images are written verbatim (their bytes are not re-encoded, so content hashes survive the round trip) under
    ``image_dir`` with content-addressed names (``<sha256[:20]><ext>``: identical images are stored once, reruns
    write identical files), referenced by paths relative to the file's folder, the reader's default image root.
    ``meta`` keys become extra record keys; a meta key named like a LLaVA field is an error.
    """
    path = Path(path)
    image_dir = Path(image_dir)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DatasetError(f"{path}: write_llava_json writes .json or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        clash = _RESERVED_KEYS.intersection(s.meta)
        if clash:
            raise DatasetError(f"{path}: sample {s.id!r}: meta key(s) {sorted(clash)} clash with LLaVA fields")
        rels = []
        for data in s.images:
            name = hashlib.sha256(data).hexdigest()[:20] + _image_ext(data)
            target = image_dir / name
            if not target.exists():
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)  # never leave a half-written image under the final name
            rels.append(Path(os.path.relpath(target, path.parent)).as_posix())
        record: dict[str, Any] = {"id": s.id}
        if len(rels) == 1:
            record["image"] = rels[0]
        elif rels:
            record["image"] = rels
        record["conversations"] = [{"from": _LLAVA_FROM[t.role], "value": t.text} for t in s.turns]
        record.update(s.meta)
        records.append(record)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix.lower() == ".jsonl":
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
    os.replace(tmp, path)
    return path
