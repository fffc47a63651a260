"""Length-bucketed batches: little padding, bounded tokens per forward, deterministic order.

The loop reads a window of encoded samples (``bucket_window``), and :func:`length_batches` cuts it into batches of
similar length. Longest first inside a window, so an out-of-memory batch shows up at the start of a run rather than
hours in. Ties keep the window order, so the same input always gives the same batches (determinism of the cache).
"""

from __future__ import annotations

from typing import Sequence


def length_batches(
    lengths: Sequence[int],
    *,
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
) -> list[list[int]]:
    """Group indices of ``lengths`` into batches; returns lists of indices into ``lengths``.

    A batch costs ``len(batch) * max(length in batch)`` padded tokens. It closes when it holds ``batch_size``
    samples or when adding the next sample would push its padded cost over ``max_tokens_per_batch`` (a single
    sample longer than the cap still forms a batch of one: it is never dropped). At least one limit must be given.
    """
    if batch_size is None and max_tokens_per_batch is None:
        raise ValueError("length_batches: give batch_size and/or max_tokens_per_batch")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"length_batches: batch_size must be >= 1, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"length_batches: max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = int(lengths[i])
        new_max = max(cur_max, n)
        full = batch_size is not None and len(cur) >= batch_size
        over = max_tokens_per_batch is not None and cur and (len(cur) + 1) * new_max > max_tokens_per_batch
        if cur and (full or over):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded tokens in ``batches`` (0 = no padding): how well the bucketing did."""
    real = sum(int(lengths[i]) for b in batches for i in b)
    padded = sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - real / padded
