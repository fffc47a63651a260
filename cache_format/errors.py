"""Errors of the cache format. Every message is one line naming the url / part / sample id / field."""
from __future__ import annotations

from vlsi.common.errors import VlsiError


class CacheError(VlsiError):
    """Base of every cache-format error (one-line message); a :class:`vlsi.common.errors.VlsiError`."""


class CacheNotFoundError(CacheError):
    """No cache at the given URL."""


class VersionError(CacheError):
    """The cache was written by a newer format version or needs a feature this reader lacks."""


class SchemaError(CacheError):
    """A record, fingerprint or metadata object has the wrong keys, shapes or dtypes."""


class DuplicateSampleError(CacheError):
    """A sample id is already committed or buffered."""


class FingerprintMismatchError(CacheError):
    """A writer was opened on a cache with a different fingerprint."""


class CorruptCacheError(CacheError):
    """Stored bytes fail a checksum or bookkeeping check."""


class StorageError(CacheError):
    """The storage backend refused an operation (permissions, bad options, unreachable)."""
