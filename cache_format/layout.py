"""Names, dtypes, shapes and codecs of a segment's arrays (SPEC section 5), and writing one segment."""
from __future__ import annotations

import numpy as np

ROOT_ATTR = "vlsi_cache"
PARTS = "parts"
COMMITS = "commits"
MANIFESTS = "manifests"
INDEXES = "indexes"
TABLES = "tables"

#: array name -> (dtype or None for the encoding's dtype, number of trailing dims after axis 0)
ARRAYS = ("input_ids", "input_offsets", "answer_positions", "answer_offsets",
          "topk_ids", "topk_logprobs", "tail_logmass")
#: (1.2) the eighth array of a sampled-targets cache: uint8 [N_ans, L, k] draw counts
COUNTS = "sample_counts"
#: (1.2, hidden-states-v1) bf16 bit patterns of the teacher's post-norm states (SPEC section 5b, `features.py`)
HIDDEN_ANSWER, HIDDEN_QUESTION, QUESTION_OFFSETS = "hidden_answer", "hidden_question", "question_offsets"
ANSWER_AXIS = ("answer_positions", "topk_ids", "topk_logprobs", "tail_logmass", COUNTS, HIDDEN_ANSWER)


def arrays_of(fingerprint) -> tuple[str, ...]:
    """The arrays every segment of a cache with this fingerprint holds (SPEC sections 5, 5b)."""
    hidden = {"none": (), "answer": (HIDDEN_ANSWER,),
              "all": (HIDDEN_ANSWER, HIDDEN_QUESTION, QUESTION_OFFSETS)}[fingerprint.hidden_states]
    return ARRAYS + ((COUNTS,) if fingerprint.targets == "sampled" else ()) + hidden
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_SEGMENT_BYTES = 64 << 20


def segment_dir(part: str, segment: str) -> str:
    return f"{PARTS}/{part}/{segment}"


def array_path(part: str, segment: str, name: str) -> str:
    return f"{segment_dir(part, segment)}/{name}"


def commit_path(part: str, segment: str) -> str:
    return f"{COMMITS}/{part}/{segment}.json"


def table_path(part: str, segment: str) -> str:
    """The segment's sample table (SPEC section 5a, v1.1): outside the Zarr hierarchy, written before the commit."""
    return f"{TABLES}/{part}/{segment}.parquet"


def segment_name(seq: int) -> str:
    return f"s{seq:06d}"


def _compressors(dtype: np.dtype, name: str):
    from zarr.codecs import BloscCodec, Crc32cCodec

    # bitshuffle wins on int32 token ids (high bytes mostly zero); byte shuffle on floats, and on bf16 bit patterns
    # (uint16, SPEC 5b: the sign + exponent byte compresses, the mantissa byte hardly; bench/genrecal_feature_cache.py
    # measured byte shuffle 0.70 B/element vs bitshuffle 0.74 on the tiny task)
    float_like = dtype.kind == "f" or name in (HIDDEN_ANSWER, HIDDEN_QUESTION)
    shuffle = "bitshuffle" if dtype.kind in "iu" and not float_like and name not in ("input_offsets",
                                                                                       QUESTION_OFFSETS) else "shuffle"
    return [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=dtype.itemsize), Crc32cCodec()]


def write_array(store, path: str, data: np.ndarray, chunk_bytes: int) -> None:
    """Write `data` as one sharded Zarr v3 array: one shard (= one object) holding inner chunks of ~chunk_bytes."""
    import zarr

    row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    inner = max(1, chunk_bytes // row_bytes)
    n0 = max(1, data.shape[0])
    inner = min(inner, n0)
    shard0 = -(-n0 // inner) * inner
    arr = zarr.create_array(
        store, name=path, shape=data.shape, dtype=data.dtype,
        chunks=(inner,) + data.shape[1:], shards=(shard0,) + data.shape[1:],
        compressors=_compressors(data.dtype, path.rsplit("/", 1)[-1]), fill_value=0, overwrite=True,
    )
    if data.size:
        arr[...] = data
