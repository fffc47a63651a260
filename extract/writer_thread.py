"""A background thread that owns the cache writer, fed through a bounded queue.

Why: compression (blosc/zstd), checksums and storage round trips (S3 PUTs) must never make the teacher wait.
The forward loop ``put``s finished batches and goes on; the thread turns them into records (the device -> host
copy happens here too, so the loop never blocks on it) and appends them. The queue is bounded: when storage is
slower than the teacher, ``put`` blocks (back-pressure) instead of buffering without limit.

Time-bounded commits: while the queue is empty the thread calls ``writer.commit_if_due()`` (if the writer has
one) every ``tick_s`` seconds, so a slow teacher's finished samples are committed ``--commit-seconds`` after the
last commit even when no further batch arrives to trigger it.

Errors: an exception in the thread is re-raised in the caller's thread at the next ``put`` or at ``close``; the
thread then stops consuming, so nothing is appended after a failure.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_STOP = object()


class WriterThreadError(RuntimeError):
    """Wraps nothing: the original exception is re-raised as is; this only marks a dead thread without one."""


class BackgroundWriter:
    """Append records to ``writer`` (anything with ``.append(record)``) from a background thread.

    Items given to :meth:`put` are a list of records or an object with ``.to_records() -> list``; converting in
    the thread keeps device synchronisation off the caller. ``on_written(records)`` (optional) runs in the thread
    after each item is appended (progress accounting). ``max_items`` bounds the queue. ``tick_s``: how often an idle
    thread calls ``writer.commit_if_due()``.
    """

    def __init__(self, writer: Any, *, max_items: int = 8, on_written: Callable[[list], None] | None = None,
                 name: str = "vlsi-cache-writer", tick_s: float = 1.0) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if not tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s}")
        self._writer = writer
        self._tick_s = float(tick_s)
        self._due = getattr(writer, "commit_if_due", None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_items)
        self._on_written = on_written
        self._error: BaseException | None = None
        self._closed = False
        self.n_records = 0
        self.busy_s = 0.0
        """Seconds the thread spent converting and appending (compression + storage)."""
        self.blocked_s = 0.0
        """Seconds ``put`` waited on a full queue (back-pressure felt by the caller)."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._tick_s) if self._due is not None else self._queue.get()
            except queue.Empty:
                if self._error is None:
                    try:
                        self._due()
                    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                        self._error = e
                continue
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drain without writing: nothing is appended after a failure
                t0 = time.perf_counter()
                records = item.to_records() if hasattr(item, "to_records") else list(item)
                for rec in records:
                    self._writer.append(rec)
                self.n_records += len(records)
                self.busy_s += time.perf_counter() - t0
                if self._on_written is not None:
                    self._on_written(records)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: Any) -> None:
        """Hand one item to the thread; blocks while the queue is full; re-raises a failure of the thread."""
        if self._closed:
            raise RuntimeError("BackgroundWriter.put after close")
        self._raise_if_failed()
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                break
            except queue.Full:
                # Poll so a writer that died while we wait is reported instead of blocking forever.
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise WriterThreadError("background writer thread died")
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until every queued item is appended, stop the thread, re-raise its failure if any.

        Does not close the underlying writer: its owner does (so it commits what was appended even when the
        caller is unwinding from its own exception).
        """
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller is failing: still drain what it handed over, but keep the caller's exception
            try:
                self.close()
            except BaseException:  # noqa: BLE001
                pass
