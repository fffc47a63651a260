"""Format version table and in-memory migrations of root metadata (SPEC section 3).

A migration upgrades the root `vlsi_cache` attributes of an older cache to the current layout *in memory*;
nothing is ever rewritten in place. To add version (1, 1): append to VERSIONS, add a function to MIGRATIONS
keyed by the version it upgrades from, and keep the golden v1.0 fixture test passing.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import SchemaError, VersionError
from .schema import FORMAT_NAME, FORMAT_VERSION, KNOWN_FEATURES

#: every released format version, oldest first, with what changed
VERSIONS: dict[tuple[int, int], str] = {
    (1, 0): "first release: CSR segments, commit records, manifests, fp16-logprob encoding",
}
#: from-version -> function(attrs) -> attrs of the next version
MIGRATIONS: dict[tuple[int, int], Callable[[dict], dict]] = {}

ROOT_KEYS = frozenset({"format", "format_version", "required", "fingerprint"})


def parse_version(v: Any, where: str) -> tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise SchemaError(f"{where}: format_version must be [major, minor], got {v!r}")
    return int(v[0]), int(v[1])


def check_and_migrate(attrs: Any, where: str) -> dict:
    """Validate root attributes and bring them to FORMAT_VERSION. Raises VersionError / SchemaError."""
    if not isinstance(attrs, dict):
        raise SchemaError(f"{where}: root attribute 'vlsi_cache' missing or not an object (not a vlsi cache)")
    if attrs.get("format") != FORMAT_NAME:
        raise SchemaError(f"{where}: format is {attrs.get('format')!r}, expected {FORMAT_NAME!r}")
    ver = parse_version(attrs.get("format_version"), where)
    if ver[0] > FORMAT_VERSION[0]:
        raise VersionError(f"{where}: cache format version {ver[0]}.{ver[1]} is newer than this reader "
                           f"({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}); upgrade vlsi to read it")
    required = attrs.get("required")
    if not isinstance(required, list):
        raise SchemaError(f"{where}: 'required' must be a list of feature names")
    unknown = sorted(set(required) - KNOWN_FEATURES)
    if unknown:
        raise VersionError(f"{where}: cache requires features this reader does not know: {unknown} "
                           f"(cache version {ver[0]}.{ver[1]}, reader {FORMAT_VERSION[0]}.{FORMAT_VERSION[1]})")
    if ver <= FORMAT_VERSION:  # a newer minor MAY add keys; only same-or-older versions are checked strictly
        unknown_keys = sorted(set(attrs) - ROOT_KEYS)
        if unknown_keys:
            raise SchemaError(f"{where}: unknown root keys {unknown_keys}")
    missing = sorted(ROOT_KEYS - set(attrs))
    if missing:
        raise SchemaError(f"{where}: missing root keys {missing}")
    while ver < FORMAT_VERSION:
        step = MIGRATIONS.get(ver)
        if step is None:
            raise VersionError(f"{where}: no migration from format version {ver[0]}.{ver[1]}")
        attrs = step(dict(attrs))
        ver = parse_version(attrs["format_version"], where)
    return attrs


def root_attrs(fingerprint_dict: dict) -> dict:
    from .schema import REQUIRED_FEATURES

    return {"format": FORMAT_NAME, "format_version": list(FORMAT_VERSION),
            "required": list(REQUIRED_FEATURES), "fingerprint": fingerprint_dict}
