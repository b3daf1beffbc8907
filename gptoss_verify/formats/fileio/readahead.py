"""Read spans of files into the page cache ahead of the reads that need them.

Why: a converter's own reads come one tensor at a time, in its order, between stretches of
compute (decoding, encoding, comparing copies); the disk sits idle during the compute and the
kernel's read-ahead (a few MB) does not bridge it. Asking the kernel for the next tensors' bytes
from background threads, several files at once, keeps the disk busy; the bytes land in the page
cache and cost no process memory. A hint only: a failed or skipped read here is
repeated, and reported, by the real read.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Span = tuple[Path, int, int]  # file, offset, length

_CHUNK = 8 << 20


class ReadAhead:
    """`warm(spans)` queues spans, each file's in offset order, different files in parallel
    (`threads` at a time); `close()` drops what has not started."""

    def __init__(self, threads: int = 4):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def warm(self, spans: Iterable[Span]) -> None:
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for file, offset, length in spans:
            if length > 0:
                by_file.setdefault(Path(file), []).append((offset, length))
        if not by_file:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="readahead")
        for file, parts in sorted(by_file.items()):
            self._pool.submit(_read, file, sorted(parts), self._stop)

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _read(file: Path, parts: list[tuple[int, int]], stop: threading.Event) -> None:
    """`posix_fadvise(WILLNEED)` piece by piece: the kernel reads what is not cached yet, and
    nothing is copied to this process (a plain read would spend a core copying cached pages)."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, length in parts:
            for start in range(offset, offset + length, _CHUNK):
                if stop.is_set():
                    return
                os.posix_fadvise(fd, start, min(_CHUNK, offset + length - start), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
