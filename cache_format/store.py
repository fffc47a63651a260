"""Where a cache lives: one URL -> an fsspec filesystem (JSON, Parquet, listings) and a Zarr store (arrays).

Local paths and file:// use zarr's LocalStore (atomic tmp+rename writes); every other scheme uses
zarr's FsspecStore over the same fsspec options. All failures become one-line CacheErrors naming the URL.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

from .errors import CacheError, CacheNotFoundError, StorageError


def _strip_scheme(url: str) -> tuple[str, bool]:
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url)), True
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://"):]), True
    return url.rstrip("/"), False


class Location:
    """A cache root. Paths given to methods are relative to the root, '/'-separated."""

    def __init__(self, url: str, storage_options: dict | None = None, *, read_only: bool = True):
        import fsspec

        if not isinstance(url, str) or not url:
            raise CacheError(f"cache url must be a non-empty string, got {url!r}")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self.root, self.is_local = _strip_scheme(url)
        try:
            if self.is_local:
                if self.storage_options:
                    raise TypeError(f"unexpected storage options {sorted(self.storage_options)}")
                self.fs = fsspec.filesystem("file")
            else:
                self.fs, self.root = fsspec.core.url_to_fs(self.root, **self.storage_options)
                self.root = self.root.rstrip("/")
        except (TypeError, ValueError, ImportError) as e:
            raise StorageError(f"{url}: bad storage options or scheme: {_one_line(e)}") from None
        self._zstore = None

    # ---- paths -------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def rel(self, full: str) -> str:
        full = full.rstrip("/")
        root = self.root.rstrip("/")
        if self.is_local:
            full = os.path.abspath(full)
        # fsspec may drop a leading '/' for object stores; compare without it
        if full.lstrip("/").startswith(root.lstrip("/") + "/"):
            return full.lstrip("/")[len(root.lstrip("/")) + 1:]
        raise StorageError(f"{self.url}: listed path {full!r} is outside the cache")

    # ---- zarr --------------------------------------------------------------------------------
    def zarr_store(self):
        if self._zstore is None:
            try:
                if self.is_local:
                    from zarr.storage import LocalStore

                    self._zstore = LocalStore(self.root, read_only=self.read_only)
                else:
                    from zarr.storage import FsspecStore

                    self._zstore = FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                                        read_only=self.read_only)
            except Exception as e:  # noqa: BLE001 - backend errors vary by scheme
                raise StorageError(f"{self.url}: cannot open store: {_one_line(e)}") from None
        return self._zstore

    # ---- objects -----------------------------------------------------------------------------
    def _guard(self, what: str, rel: str, e: Exception) -> CacheError:
        if isinstance(e, CacheError):
            return e
        if isinstance(e, FileNotFoundError):
            return CacheNotFoundError(f"{self.url}: {rel or 'root'} not found")
        return StorageError(f"{self.url}: cannot {what} {rel or 'root'}: {_one_line(e)}")

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(rel)))
        except Exception as e:  # noqa: BLE001
            raise self._guard("stat", rel, e) from None

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except Exception as e:  # noqa: BLE001
            raise self._guard("read", rel, e) from None

    def read_range(self, rel: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object (``start < 0``: from the end, ``end=None``: to the end)."""
        try:
            if self.is_local:
                with open(self.path(rel), "rb") as f:
                    if start < 0:
                        size = os.fstat(f.fileno()).st_size
                        start = max(size + start, 0)
                    f.seek(start)
                    return f.read() if end is None else f.read(max(end - start, 0))
            return self.fs.cat_file(self.path(rel), start=start, end=end)
        except Exception as e:  # noqa: BLE001
            raise self._guard("read", rel, e) from None

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            from .errors import CorruptCacheError

            raise CorruptCacheError(f"{self.url}: {rel} is not valid JSON ({_one_line(e)})") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object so readers see all of it or nothing (tmp + rename locally; a single PUT remotely)."""
        if self.read_only:
            raise StorageError(f"{self.url}: opened read-only, cannot write {rel}")
        p = self.path(rel)
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            else:
                self.fs.pipe_file(p, data)
        except Exception as e:  # noqa: BLE001
            raise self._guard("write", rel, e) from None

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; True if this call created it.

        Local filesystems: atomic (``os.link`` of a complete temp file fails if the name exists), so of several
        processes exactly one wins. Object stores without conditional writes: check-then-write, best effort; the
        commit records' fingerprint digest is the backstop there (a writer re-reads the root before it commits).
        """
        if self.read_only:
            raise StorageError(f"{self.url}: opened read-only, cannot write {rel}")
        if not self.is_local:
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        p = self.path(rel)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, p)
                return True
            except FileExistsError:
                return False
        except Exception as e:  # noqa: BLE001
            raise self._guard("write", rel, e) from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, sort_keys=True, indent=1).encode())

    def find(self, rel_prefix: str) -> list[str]:
        """All object paths under a prefix, relative to the root, sorted. [] if the prefix does not exist."""
        try:
            found = self.fs.find(self.path(rel_prefix))
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._guard("list", rel_prefix, e) from None
        return sorted(self.rel(p) for p in found)

    def size(self, rel: str) -> int:
        try:
            return int(self.fs.size(self.path(rel)))
        except Exception as e:  # noqa: BLE001
            raise self._guard("stat", rel, e) from None

    def remove(self, rel: str) -> None:
        if self.read_only:
            raise StorageError(f"{self.url}: opened read-only, cannot remove {rel}")
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._guard("remove", rel, e) from None

    def invalidate(self) -> None:
        """Forget cached listings (object-store filesystems cache them)."""
        inv = getattr(self.fs, "invalidate_cache", None)
        if inv is not None:
            inv()


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    msg = s[0] if s else ""
    return f"{type(e).__name__}: {msg}"[:300]
