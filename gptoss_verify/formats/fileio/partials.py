"""Owned partial outputs: every file or folder we write is first a partial that a later run can tell
from a live writer's, and remove once its writer is gone (docs/reliability.md).

Nothing is written in place. A destination `NAME` is written as `.NAME.partial-TOKEN` beside it
and renamed onto `NAME` when complete (same folder, so the rename is atomic): the destination is
absent or complete, never half-written. A run killed part way (SIGKILL, the OOM killer, a power
cut) cannot remove its partial, so each partial has an owner record `.NAME.partial-TOKEN.owner`
beside it: created before the partial and removed after it, holding the writer's pid, host, boot
id and process start time, and held under an exclusive `flock` for as long as the writer lives
(the kernel drops the lock when the process dies, however it dies).

Every claim first sweeps its folder: a partial is removed when its owner record is unlocked and
names a process of this host that no longer runs (pid gone, or reused: another start time or
boot), or when it has no owner record at all (the record is created first and removed last, so
only a partial of an earlier version of this tool lacks one). A locked record, a record of another
host, or a record whose process still runs is never touched.

The public pieces, for any command that writes:

    with atomic_directory(dst) as tmp:     # a folder: write into tmp; renamed onto dst at the end
        ...
    with atomic_output(path, directory=False) as tmp:   # one file, the same way
        ...
    write_file(path, text_or_bytes)        # a whole small file (reports, manifests, JSON)
    with scratch_directory(parent, "label") as tmp:     # owned scratch space, removed at the end
        ...

Any OSError while writing (disk full, I/O error) becomes one `WriteError` naming the file that
was being written (its destination name), after the partial is removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner"
# `.NAME.partial-TOKEN`: our tokens are 12 hex digits; 8 of [a-z0-9_] is tempfile.mkdtemp's, as the
# partials of earlier versions were named (they had no owner record)
_PARTIAL = re.compile(r"^\..+\.partial-[A-Za-z0-9_]{8,}$")


class WriteError(CheckpointError):
    """An output could not be written (disk full, I/O error, another run finished it first). The
    message names the file; the partial output has been removed and the destination is as it was.
    A `ValueError`, so the CLI prints it as one line and exits 1. `file`, `reason` and `dst`
    (when it came from an OSError) let an enclosing partial name the file by its final name."""

    def __init__(self, message: str, file: Path | None = None, reason: str = "", dst: Path | None = None):
        super().__init__(message)
        self.file, self.reason, self.dst = file, reason, dst


# ---- who owns a partial -----------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the boot
    id it tells a live owner from a later process that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_record() -> dict:
    """What an owner record says about this process."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _start_ticks(pid),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _runs(record: dict) -> bool:
    """Whether the process a record of this host names still runs (the same one, not a reuse of its pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    ticks = record.get("start_ticks")
    now = _start_ticks(pid)
    return ticks is None or now is None or ticks == now


# ---- claiming, committing, discarding ----------------------------------------------------------
@dataclasses.dataclass
class Partial:
    """One owned partial: write `path`, then `commit()` (rename onto the destination) or `discard()`."""
    dst: Path
    path: Path
    owner: Path
    directory: bool
    _fd: int

    def commit(self) -> None:
        """Rename the finished partial onto the destination (an empty directory there is replaced),
        then drop the owner record."""
        try:
            os.replace(self.path, self.dst)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            raise WriteError(f"{self.dst}: was written by another run while this one ran; it is left as "
                             "that run wrote it (this run's output was removed)") from None
        self._release()

    def discard(self) -> None:
        _remove(self.path)
        self._release()

    def _release(self) -> None:
        try:
            self.owner.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:  # the output is done; the unlocked record goes at the next sweep
            log.warning("cannot remove the owner record %s (%s)", self.owner, err)
        os.close(self._fd)  # also drops the lock


def claim(dst: str | Path, *, directory: bool) -> Partial:
    """Sweep `dst`'s folder, then create an owned partial for `dst` (an empty directory, or an
    empty file): owner record first, locked and filled in, then the partial itself."""
    dst = Path(dst)
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    record = json.dumps(owner_record()).encode()
    while True:
        base = parent / f".{dst.name}.partial-{secrets.token_hex(6)}"
        owner = base.with_name(base.name + OWNER_SUFFIX)
        fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _lock(fd, blocking=True)
            if os.fstat(fd).st_nlink == 0:  # a sweep took it between our open and our lock: again
                os.close(fd)
                continue
            os.write(fd, record)
            if directory:
                os.mkdir(base)
            else:
                os.close(os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except BaseException:
            with contextlib.suppress(OSError):
                owner.unlink()
            os.close(fd)
            raise
        return Partial(dst, base, owner, directory, fd)


def _lock(fd: int, blocking: bool) -> bool | None:
    """flock: True taken, False held by someone else, None where the filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
        path.unlink()
    if path.is_dir() and not path.is_symlink():  # rmtree left something: try once more, loudly
        shutil.rmtree(path)


def sweep(parent: str | Path) -> list[Path]:
    """Remove the partials in `parent` whose owner is gone; returns what was removed."""
    parent = Path(parent)
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in names:
        if name.endswith(OWNER_SUFFIX) and _PARTIAL.match(name[: -len(OWNER_SUFFIX)]):
            removed += _sweep_owned(parent / name[: -len(OWNER_SUFFIX)], parent / name)
    for name in names:
        path = parent / name
        if _PARTIAL.match(name) and not os.path.lexists(str(path) + OWNER_SUFFIX) and os.path.lexists(path):
            # no owner record: from a version before owner records (ours create it first, drop it last)
            log.warning("removing %s: a partial output without an owner record (left by an earlier run)", path)
            _remove(path)
            removed.append(path)
    return removed


def _sweep_owned(path: Path, owner: Path) -> list[Path]:
    try:
        fd = os.open(owner, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError):
        return []
    try:
        locked = _lock(fd, blocking=False)
        if locked is False:
            return []  # its writer holds the lock: alive
        try:
            record = json.loads(os.read(fd, 1 << 16) or b"null")
        except ValueError:
            record = None
        if not isinstance(record, dict):
            # empty: its writer died between creating and filling it (or has not locked it yet, and
            # will see the record unlinked and make another); without locks we cannot tell
            if locked is None:
                return []
            record = {}
        elif record.get("host") != socket.gethostname() or _runs(record):
            return []  # another host's (its process cannot be checked from here), or still running
        who = (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
               if record else "its writer died while starting")
        if os.path.lexists(path):
            log.warning("removing %s: the partial output of a run that is gone (%s)", path, who)
            _remove(path)
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()
        return [path]
    finally:
        os.close(fd)


# ---- what writers use ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(dst: str | Path, *, directory: bool) -> Iterator[Path]:
    """Yield an owned partial for `dst` (a directory, or a file); on success rename it onto `dst`,
    on any error remove it. An OSError of a write (disk full, I/O error) becomes one `WriteError`
    naming the file."""
    dst = Path(dst)
    if not directory and dst.is_symlink():  # a file through a link (a report linked into docs/): write its target
        dst = Path(os.path.realpath(dst))
    try:
        partial = claim(dst, directory=directory)
    except OSError as err:
        raise _write_error(err, dst, None) from None
    try:
        yield partial.path
        partial.commit()
    except BaseException as exc:
        partial.discard()
        if isinstance(exc, WriteError) and exc.file is not None and _inside(exc.file, partial.path):
            # a nested output's error (a checkpoint inside a case): named by the outer destination
            raise _named_error(_final_name(exc.file, dst, partial.path), exc.reason, dst) from None
        os_error = None if isinstance(exc, (KeyboardInterrupt, WriteError)) else write_os_error(exc, partial.path)
        if os_error is not None:
            raise _write_error(os_error, dst, partial.path) from None
        raise


def check_destination(dst: str | Path) -> Path:
    """A destination folder must not exist, or be an empty directory."""
    dst = Path(dst)
    if dst.is_symlink():  # the commit renames onto the link itself, which a directory cannot replace
        raise CheckpointError(f"{dst}: destination is a symbolic link (to {os.readlink(dst)}); give the folder it "
                              "points to, or a new name")
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst}: destination exists and is not a directory")
        if any(dst.iterdir()):
            raise CheckpointError(f"{dst}: destination exists and is not empty")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | Path) -> Iterator[Path]:
    """An output folder: `dst` must be absent or empty; yields an owned partial folder beside it,
    renamed onto `dst` when the block ends cleanly, removed on any error (so `dst` is complete or
    as it was). Used by every checkpoint layout, `case export` and the like."""
    dst = check_destination(dst)
    with atomic_output(dst, directory=True) as tmp:
        yield tmp
        os.chmod(tmp, 0o755)


@contextlib.contextmanager
def scratch_directory(parent: str | Path, label: str) -> Iterator[Path]:
    """An owned scratch folder `.label.partial-TOKEN` in `parent`, removed at the end whatever
    happens (and by a later run's sweep if this one is killed)."""
    partial = claim(Path(parent) / label, directory=True)
    try:
        yield partial.path
    finally:
        partial.discard()


def write_file(path: str | Path, data: str | bytes) -> None:
    """Write a whole file atomically (an owned partial beside it, renamed onto it)."""
    with atomic_output(path, directory=False) as tmp:
        with open_output(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def write_os_error(exc: BaseException | None, partial: Path | None = None, depth: int = 0) -> OSError | None:
    """The OSError of a write behind `exc`: itself, its cause or (unsuppressed) context, or a failure
    that torch.distributed.checkpoint wrapped (`CheckpointException.failures`). An OSError naming a
    file outside `partial` is a read error, not ours to rename: None."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError):
        if exc.filename and partial is not None and not _inside(Path(os.fsdecode(exc.filename)), partial):
            return None
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException) and (found := write_os_error(inner, partial, depth + 1)):
                return found
    if isinstance(exc, CheckpointError):
        return None  # already one clear message of ours
    context = None if exc.__suppress_context__ else exc.__context__
    return write_os_error(exc.__cause__, partial, depth + 1) or write_os_error(context, partial, depth + 1)


def _inside(path: Path, partial: Path) -> bool:
    try:
        path.absolute().relative_to(partial.absolute())
        return True
    except ValueError:
        return False


def _final_name(name: Path, dst: Path, partial: Path | None) -> Path:
    """The destination file a file inside `partial` becomes (`dst` for the partial itself)."""
    if partial is not None:
        with contextlib.suppress(ValueError):
            name = dst / name.absolute().relative_to(partial.absolute()) if name != partial else dst
    if name.name.endswith(".partial"):  # a file's own partial inside the folder's (TorchZipWriter)
        name = name.with_name(name.name[: -len(".partial")])
    return name


def _write_error(err: OSError, dst: Path, partial: Path | None) -> WriteError:
    """'FILE: cannot write (REASON); ...', FILE being the destination file that was being written
    (the partial's name mapped back onto the destination) or, when the error names none, `dst`."""
    name = _final_name(Path(os.fsdecode(err.filename)) if err.filename else dst, dst, partial)
    reason = err.strerror or str(err) or type(err).__name__
    return _named_error(name, f"[Errno {err.errno}] {reason}" if err.errno else reason, dst)


def _named_error(name: Path, reason: str, dst: Path) -> WriteError:
    return WriteError(f"{name}: cannot write ({reason}); nothing was written to {dst} (the partial output was removed)",
                      name, reason, dst)


def open_output(path: str | Path, mode: str = "wb", buffering: int = -1):
    """`open` for a file inside a partial: the same file object, except that an OSError of a write
    (which names no file) names this one, so `atomic_output` can say which file failed."""
    return _NamedErrors(open(path, mode, buffering=buffering), path)


class _NamedErrors:
    def __init__(self, f, path):
        self._f, self._path = f, str(path)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _named(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            if err.filename:
                raise
            raise OSError(err.errno, err.strerror, self._path) from None

    def write(self, data):
        return self._named(self._f.write, data)

    def truncate(self, *size):
        return self._named(self._f.truncate, *size)

    def flush(self):
        return self._named(self._f.flush)

    def close(self):
        return self._named(self._f.close)
