"""Write many rank files at once: each tensor is built once and handed to every file holding a copy.

Why: the legacy Megatron layout stores the same bytes in several files (a tensor-parallel piece in
every expert-parallel rank's file, an expert in every tensor-parallel rank's file), and one stream
of writes gets a fraction of what the disk takes from several (on the 2-core benchmark machine,
`dd ... conv=fdatasync`: 0.33-0.85 GB/s from one writer, 1.05-1.4 GB/s from four). So every file
has its own writer thread (file writes release the GIL), the caller builds each distinct tensor
once, its CRC32 is computed once for all its copies, and the bytes queued for writing are bounded
by `budget`, so memory holds the tensor being built plus at most `budget` bytes waiting.
"""
from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .torch_save_file import StreamingTorchFile
from .torch_zip import tensor_bytes


class _Job:
    """One tensor on its way to `left` more files."""
    __slots__ = ("name", "tensor", "crc", "nbytes", "left")

    def __init__(self, name, tensor, crc, nbytes, left):
        self.name, self.tensor, self.crc, self.nbytes, self.left = name, tensor, crc, nbytes, left


class FanOutWriter:
    """`add(key, file)` for every file; `put(keys, name, tensor)` in each file's own order;
    `close()` at the end, or `abort()` after an error (it removes every partial file). An error in
    a writer thread is raised by the next `put` or by `close`."""

    def __init__(self, budget: int):
        self.budget = budget
        self._cv = threading.Condition()
        self._pending = 0
        self._errors: list[BaseException] = []
        self._files: dict[Hashable, StreamingTorchFile] = {}
        self._queues: dict[Hashable, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._crc = ThreadPoolExecutor(1, thread_name_prefix="crc32")
        self._stopped = False

    def add(self, key: Hashable, file: StreamingTorchFile) -> None:
        q: queue.SimpleQueue = queue.SimpleQueue()
        thread = threading.Thread(target=self._drain, args=(file, q), name=f"write-{key}", daemon=True)
        self._files[key], self._queues[key] = file, q
        self._threads.append(thread)
        thread.start()

    def put(self, keys: Sequence[Hashable], name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` for the files `keys`; waits while more than `budget` bytes are queued."""
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        with self._cv:
            self._cv.wait_for(lambda: self._errors or not self._pending or self._pending + nbytes <= self.budget)
            self._raise_first_error()
            self._pending += nbytes
        crc = self._crc.submit(zlib.crc32, tensor_bytes(tensor)) if nbytes else 0
        job = _Job(name, tensor, crc, nbytes, len(keys))
        for key in keys:
            self._queues[key].put(job)

    def close(self) -> None:
        """Wait until every queued tensor is written, then finish every file."""
        self._stop()
        with self._cv:
            if self._errors:
                self._abort_files()
                self._raise_first_error()
        try:
            for file in self._files.values():
                file.close()
        except BaseException:
            self._abort_files()
            raise

    def abort(self) -> None:
        self._stop()
        self._abort_files()

    # ---- internals ----------------------------------------------------------------------------
    def _drain(self, file: StreamingTorchFile, q: queue.SimpleQueue) -> None:
        while (job := q.get()) is not None:
            try:
                if not self._errors:
                    file.put(job.name, job.tensor, crc=job.crc)
            except BaseException as err:  # handed to the producer, which aborts everything
                with self._cv:
                    self._errors.append(err)
                    self._cv.notify_all()
            finally:
                with self._cv:
                    job.left -= 1
                    if job.left == 0:
                        job.tensor = job.crc = None
                        self._pending -= job.nbytes
                        self._cv.notify_all()

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for q in self._queues.values():
            q.put(None)
        for thread in self._threads:
            thread.join()
        self._crc.shutdown()

    def _abort_files(self) -> None:
        for file in self._files.values():
            file.abort()

    def _raise_first_error(self) -> None:
        if self._errors:
            raise self._errors[0]
