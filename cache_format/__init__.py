"""vlsi.cache_format: the teacher cache contract (see SPEC.md, which this package mirrors).

Write with `CacheWriter`, read with `open_cache`, check with `verify_cache`; `diff_fingerprints` and
`check_compatibility` tell train why a cache does not fit its tokenizer/processor/model.
"""
from .commit import Segment
from .compact import compact, finalize, merge
from .compat import check_compatibility, config_hash, processor_settings, tokenizer_hash
from .encodings import ENCODINGS, ValueEncoding, get_encoding, register_encoding
from .errors import (CacheError, CacheNotFoundError, CorruptCacheError, DuplicateSampleError,
                     FingerprintMismatchError, SchemaError, StorageError, VersionError)
from .reader import CacheReader, open_cache
from .samples import id_hash
from .schema import (FORMAT_NAME, FORMAT_VERSION, FieldDiff, Fingerprint, SampleRecord, diff_fingerprints,
                     validate_record)
from .shard import in_shard
from .verify import VerifyReport, verify_cache
from .writer import CacheWriter

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "Fingerprint", "SampleRecord", "FieldDiff", "diff_fingerprints",
    "validate_record", "CacheWriter", "open_cache", "CacheReader", "verify_cache", "VerifyReport",
    "finalize", "compact", "merge", "check_compatibility", "tokenizer_hash", "processor_settings", "config_hash",
    "ENCODINGS", "ValueEncoding", "get_encoding", "register_encoding", "Segment", "in_shard", "id_hash",
    "CacheError", "CacheNotFoundError", "CorruptCacheError", "DuplicateSampleError", "FingerprintMismatchError",
    "SchemaError", "StorageError", "VersionError",
]
