"""Fault injection at the write calls, for the kill and full-disk tests.

`Faults(root, ...)` wraps, for paths under `root`, every filesystem mutation a writer makes through
Python: `open` for writing and each `write` of the file it returns, `os.open`/`os.write`, `mkdir`,
`truncate`, `rename`/`replace`, `unlink`/`rmdir`/`rmtree`. Each is one numbered event. At the chosen
event it acts:
- `kill`: SIGKILL to this process, before the event (or, for a write, after half its bytes);
- `ENOSPC` / `EIO`: that OSError, as the kernel would give it (a write first stores what fits).
Writes made outside Python (safetensors' Rust `save_file`, torch's C++ path writers) are not seen;
the layouts we write go through Python file objects. `events` lists what was seen (kind, path, bytes).

`run_forked(fn, faults)` runs `fn()` in a forked child with the faults installed, so a kill is a real
SIGKILL of the writing process; `installed(faults)` installs them in this process (ENOSPC tests).
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys
import time

_STRERROR = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error"}


class Faults:
    def __init__(self, root, at: int | None = None, action: str = "kill", mid_write: bool = False):
        self.root = os.path.realpath(root) + os.sep
        self.at, self.action, self.mid_write = at, action, mid_write
        self.events: list[tuple[str, str, int]] = []
        self.fired = False

    def under(self, path) -> bool:
        try:
            p = os.fspath(path)
        except TypeError:
            return False
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        if not isinstance(p, str):
            return False
        return os.path.realpath(os.path.join(os.getcwd(), p)).startswith(self.root) if p else False

    def event(self, kind: str, path, nbytes: int = 0) -> bool:
        """Record one event; act if it is the chosen one. Returns True when a write should store
        only part of its bytes and then fail (the caller handles that)."""
        n = len(self.events)
        self.events.append((kind, str(path), nbytes))
        if n != self.at or self.fired:
            return False
        self.fired = True
        if self.action == "kill":
            if kind == "write" and self.mid_write and nbytes > 1:
                return True
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "write" and nbytes > 1:
            return True
        raise OSError(self.errno, _STRERROR[self.errno])

    @property
    def errno(self) -> int:
        return {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO}[self.action]

    def after_part(self) -> None:
        """A write stored its first half: now die, or fail as the disk did."""
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(self.errno, _STRERROR[self.errno])


class _Tracked:
    """A file object whose writes are events."""

    def __init__(self, f, path, faults: Faults):
        self._f, self._path, self._faults = f, path, faults

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def write(self, data):
        raw = data.encode() if isinstance(data, str) else data
        n = memoryview(raw).nbytes
        if self._faults.event("write", self._path, n):
            self._f.write(data[: len(data) // 2] if isinstance(data, str) else memoryview(raw).cast("B")[: n // 2])
            self._f.flush()
            self._faults.after_part()
        return self._f.write(data)

    def truncate(self, *size):
        self._faults.event("truncate", self._path)
        return self._f.truncate(*size)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@contextlib.contextmanager
def installed(faults: Faults):
    real = {"open": builtins.open, "os_open": os.open, "os_write": os.write, "mkdir": os.mkdir,
            "replace": os.replace, "rename": os.rename, "unlink": os.unlink, "remove": os.remove,
            "rmdir": os.rmdir, "rmtree": shutil.rmtree, "truncate": os.truncate}
    fds: dict[int, str] = {}

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, int) or not any(c in mode for c in "wax+") or not faults.under(file):
            return real["open"](file, mode, *args, **kwargs)
        faults.event("open", file)
        return _Tracked(real["open"](file, mode, *args, **kwargs), file, faults)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None and flags & _WRITE_FLAGS and faults.under(path):
            faults.event("open", path)
            fd = real["os_open"](path, flags, mode)
            fds[fd] = str(path)
            return fd
        return real["os_open"](path, flags, mode, dir_fd=dir_fd)

    def os_write(fd, data):
        if fd in fds and faults.event("write", fds[fd], memoryview(data).nbytes):
            real["os_write"](fd, bytes(memoryview(data).cast("B")[: memoryview(data).nbytes // 2]))
            faults.after_part()
        return real["os_write"](fd, data)

    def simple(kind, name):
        def call(path, *args, **kwargs):
            if not kwargs.get("dir_fd") and faults.under(path):
                faults.event(kind, path)
            return real[name](path, *args, **kwargs)
        return call

    def mkdir(path, *args, **kwargs):
        # the kernel answers a mkdir of an existing path with EEXIST before any space is needed, so
        # it is no point where a disk can fail (pathlib's mkdir(exist_ok=True) relies on that): it is
        # an event of its own kind (a point to kill at, numbered as any other), never to fail at
        if not kwargs.get("dir_fd") and faults.under(path):
            faults.event("mkdir-existing" if os.path.lexists(path) else "mkdir", path)
        return real["mkdir"](path, *args, **kwargs)

    patches = {(builtins, "open"): open_, (io, "open"): open_, (os, "open"): os_open, (os, "write"): os_write,
               (os, "mkdir"): mkdir, (os, "replace"): simple("rename", "replace"),
               (os, "rename"): simple("rename", "rename"), (os, "unlink"): simple("remove", "unlink"),
               (os, "remove"): simple("remove", "remove"), (os, "rmdir"): simple("remove", "rmdir"),
               (shutil, "rmtree"): simple("remove", "rmtree"), (os, "truncate"): simple("truncate", "truncate")}
    saved = {k: getattr(*k) for k in patches}
    for (mod, name), fn in patches.items():
        setattr(mod, name, fn)
    try:
        yield faults
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def run_forked(fn, faults: Faults, log_path=None, timeout: float = 120.0) -> int:
    """Run `fn()` (returning an exit code) in a forked child with `faults` installed. Returns the
    child's exit code, or -SIGNAL (-9 for a kill). `log_path`: where the child writes its events (JSON)
    and, beside it, its stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 98
        try:
            import torch
            torch.set_num_threads(1)
            # pytest's capture replaced sys.stdout/stderr: point both at real files
            err = os.open(str(log_path) + ".stderr" if log_path is not None else os.devnull,
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(err, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = builtins.open(2, "w", buffering=1, closefd=False)
            sys.stdout = builtins.open(1, "w", closefd=False)
            with installed(faults):
                code = int(fn() or 0)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 97
        finally:
            if log_path is not None:
                with builtins.open(log_path, "w") as f:
                    json.dump(faults.events, f)
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"the writer child ran past {timeout} s")
        time.sleep(0.005)
