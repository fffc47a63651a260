"""`vlsi-cache derive`: a smaller cache made from a shared one, without the teacher (SPEC section 4 `derived_from`).

The derived cache keeps a subset of the source's target layers (the final head always), the first ``top_k`` present
entries of each row (the mass of the others moves to the tail, exactly as the encoder's truncation does) and any
encoding. Its fingerprint is the source's with those fields changed and ``derived_from`` recording the source's
fingerprint and digest and the derivation, so it never mixes with a teacher-extracted cache or with another
derivation. Writing goes through :class:`CacheWriter` (commit records last, resume skips committed ids): a derive
killed midway is finished by running it again.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from .encodings import canonical_name, get_encoding
from .errors import CacheError
from .reader import open_cache
from .schema import Fingerprint, SampleRecord
from .writer import CacheWriter

__all__ = ["derive", "derived_fingerprint", "truncate_rows"]


def derived_fingerprint(src: Fingerprint, *, layers: Sequence[int] | None = None, top_k: int | None = None,
                        encoding: str | None = None, tool_version: str = "") -> Fingerprint:
    """The fingerprint of a cache derived from one with fingerprint ``src`` (see the module doc)."""
    layers = tuple(src.target_layers) if layers is None else tuple(sorted({int(x) for x in layers}))
    missing = sorted(set(layers) - set(src.target_layers))
    if missing:
        raise CacheError(f"derive: layers {missing} are not target layers of the source "
                         f"(it has {list(src.target_layers)})")
    k = src.top_k if top_k is None else int(top_k)
    if not 1 <= k <= src.top_k:
        raise CacheError(f"derive: --top-k {k} must be in [1, {src.top_k}] (the source's top_k)")
    if src.targets == "sampled" and k != src.top_k:
        raise CacheError("derive: a sampled-targets cache keeps its width (its counts must sum to samples_per_row); "
                         "drop --top-k")
    enc = canonical_name(encoding or src.value_encoding)
    get_encoding(enc)
    how = {"layers": list(layers), "top_k": k, "value_encoding": enc}
    return replace(src, target_layers=layers, top_k=k, value_encoding=enc,
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   tool_version=tool_version or src.tool_version,
                   derived_from={"source_digest": src.digest(), "source_fingerprint": src.to_dict(), **how})


def truncate_rows(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, k: int):
    """The first ``k`` entries of each [.., K] row; the dropped present entries' mass is added to the tail."""
    if k >= ids.shape[-1]:
        return ids, lp, tail
    dropped = np.exp(lp[..., k:].astype(np.float64)).sum(-1)
    moved = np.minimum(np.log(np.exp(tail.astype(np.float64)) + dropped), 0.0)
    new_tail = np.where(dropped > 0, moved, tail).astype(np.float32)
    return np.ascontiguousarray(ids[..., :k]), np.ascontiguousarray(lp[..., :k]), new_tail


def derive(src_url: str, dst_url: str, *, layers: Sequence[int] | None = None, top_k: int | None = None,
           encoding: str | None = None, storage_options: dict | None = None, limit: int | None = None,
           progress: Callable[[int], None] | None = None, segment_bytes: int | None = None) -> dict:
    """Write the derived cache of ``src_url`` at ``dst_url`` (resumable). Returns a summary dict."""
    rd = open_cache(src_url, storage_options=storage_options)
    sfp = rd.fingerprint
    fp = derived_fingerprint(sfp, layers=layers, top_k=top_k, encoding=encoding)
    rows = [sfp.target_layers.index(x) for x in fp.target_layers] + [sfp.n_layers - 1]  # the final head last
    kw = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
    n_new = n_seen = 0
    with CacheWriter(dst_url, fp, storage_options=storage_options, resume=True, **kw) as w:
        done = w.committed_ids()
        for rec in rd.iter():
            if limit is not None and n_seen >= limit:
                break
            n_seen += 1
            if rec.sample_id in done:
                continue
            ids, lp, tail = truncate_rows(rec.topk_ids[:, rows], rec.topk_logprobs[:, rows],
                                          rec.tail_logmass[:, rows], fp.top_k)
            counts = None if rec.sample_counts is None else np.ascontiguousarray(rec.sample_counts[:, rows])
            if w.append(SampleRecord(rec.sample_id, rec.content_hash, rec.input_ids, rec.answer_positions,
                                     ids, lp, tail, counts, rec.hidden_answer, rec.hidden_question)):
                n_new += 1
            if progress is not None:
                progress(1)
    return {"source": src_url, "derived": dst_url, "n_samples": n_seen, "written": n_new,
            "layers": fp.layer_names, "top_k": fp.top_k, "value_encoding": fp.value_encoding}
