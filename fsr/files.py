"""Safe file-system work: nothing lost, nothing half-written, every failure named.

Every layer that writes files (export, engines, manifests, reports) goes through here:

- `atomic_write(path, data)`: a temporary file beside ``path``, fsync, rename over it,
  fsync of the folder. ``before_replace`` runs just before the rename (``fsr-build``
  records an engine in the manifest there, so no engine file ever exists that the
  manifest does not describe).
- `OutputFolder`: a whole output folder written into a temporary folder beside the
  target and moved into place by one atomic step that cannot replace what it should
  not: a new folder appears with ``renameat2(RENAME_NOREPLACE)``, a replaced export is
  swapped with ``renameat2(RENAME_EXCHANGE)``; where the file system lacks those, two
  plain renames under a lock (and a recovery, below). `check_output_folder` is the same
  check without side effects, for a CLI to call before it loads anything.
- Ownership: temporaries are named ``.NAME.partial-OWNER-XXXXXXXX`` where OWNER names
  the machine, its boot, the process id and the process start time. `clean_stale`
  removes the temporaries of processes that no longer run (SIGKILL, power loss) and
  never one whose process is alive or whose owner it cannot check (another machine).
- Signals: `signals_as_interrupts` turns SIGTERM and SIGHUP into the same path as
  Ctrl-C (`Interrupted`, a `KeyboardInterrupt`), and `critical` defers all three
  while a commit runs, so an interrupt leaves either the old state or the new one;
  an interrupt that a C++ library swallowed (TensorRT's callbacks) is raised again at
  the next checkpoint.
- Errors: `OutputError` (an `FsrError`) names the place and the fix for an
  unwritable, read-only, virtual (/proc) or full file system; `write_errors` turns
  such low-level failures (OSError, and the "No space left on device" of the Rust
  and C++ writers under safetensors, tokenizers and torch) into it.

Linux is the main target (renameat2, /proc for process start times); elsewhere the
portable fallbacks apply and a partial folder is removed only when its process id no
longer exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from fsr.errors import FsrError

try:  # POSIX; elsewhere commits run without the cross-process lock
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- errors


class OutputError(FsrError, OSError):
    """An output cannot be written where asked; the message names the place and the fix."""


class OutputExistsError(OutputError):
    """The output already exists (or appeared while we wrote) and may not be replaced."""


class RefusedReplaceError(OutputError):
    """``--force`` was asked to replace something that is not ours to replace."""


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGHUP"):
    SIGNAL_NAMES[signal.SIGHUP] = "SIGHUP"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP while a write ran. A `KeyboardInterrupt`, so every
    ``except KeyboardInterrupt`` path handles all three alike.

    ``str(exc)`` says what happened to the output (``detail``, set by the writer that
    knows); ``exit_code`` is the shell convention, 128 + the signal number.
    """

    def __init__(self, signum: int = signal.SIGINT, detail: str | None = None):
        self.signum, self.detail = int(signum), detail
        super().__init__(self.message)

    @property
    def signal_name(self) -> str:
        return SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def message(self) -> str:
        return f"interrupted by {self.signal_name}" + (f": {self.detail}" if self.detail else "")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- signals


class _Signals:
    """The process-wide state behind `signals_as_interrupts` and `critical` (main thread).

    Python runs a signal handler at the next bytecode of the main thread, which may be
    inside a callback that a C++ library calls (TensorRT's logger and progress monitor):
    the library catches the `Interrupted` raised there and carries on, or turns it into
    its own error ("build canceled"). So a raised interrupt stays ``unconfirmed`` until
    it passes through one of our context managers; `checkpoint` raises it again where
    it was lost, and `swallowed_since` tells a library error that was one.
    """

    def __init__(self):
        self.depth = 0  # nested signals_as_interrupts
        self.deferring = 0  # nested critical sections
        self.pending: int | None = None  # arrived inside a critical section
        self.unconfirmed: int | None = None  # raised, not yet seen propagating
        self.raised = 0  # Interrupted raised so far, and the last signal
        self.last: int | None = None

    def _raise(self, signum: int):
        self.unconfirmed, self.raised, self.last = signum, self.raised + 1, signum
        raise Interrupted(signum)

    def handler(self, signum, frame):
        if self.deferring:
            if self.pending is None:
                self.pending = signum
            return
        self._raise(signum)

    def checkpoint(self) -> None:
        """Outside critical sections: raise a deferred signal, or one a library swallowed."""
        if self.deferring or not self.depth:
            return
        signum = self.pending if self.pending is not None else self.unconfirmed
        if signum is not None:
            self.pending = None
            self._raise(signum)

    def seen(self) -> None:
        self.unconfirmed = None

    def swallowed_since(self, count: int) -> int | None:
        """The signal of an `Interrupted` raised after ``count`` (None if none was)."""
        return self.last if self.raised > count else None


_SIGNALS = _Signals()


def _handled_signals() -> list[int]:
    return [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise `Interrupted`.

    A signal the process ignores (``nohup`` ignores SIGHUP, a background job SIGINT)
    stays ignored. Outside the main thread, where Python cannot set handlers, this does
    nothing. Nested use is fine; the previous handlers come back at the end. An
    interrupt that a library swallowed inside the block is raised when it ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in _handled_signals():
        old = signal.getsignal(s)
        if old is signal.SIG_IGN:
            continue
        previous[s] = old
        signal.signal(s, _SIGNALS.handler)
    _SIGNALS.depth += 1
    try:
        yield
    except Interrupted:
        _SIGNALS.seen()
        raise
    else:
        _SIGNALS.checkpoint()
    finally:
        _SIGNALS.depth -= 1
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        if not _SIGNALS.depth:
            _SIGNALS.pending = _SIGNALS.unconfirmed = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP (under `signals_as_interrupts`) until the block ends.

    A signal that arrives inside is raised as `Interrupted` right after the outermost
    critical block, so the block itself (a rename, a manifest update, a clean-up) is
    never cut in two. Without `signals_as_interrupts` the signals keep their usual
    effect (SIGKILL cannot be deferred either: `clean_stale` recovers after it). If the
    block fails, its error propagates and a deferred signal waits for the next
    checkpoint (the end of the next critical block or of `signals_as_interrupts`).
    """
    _SIGNALS.deferring += 1
    try:
        yield
    except BaseException as exc:
        _SIGNALS.deferring -= 1
        if isinstance(exc, Interrupted):
            _SIGNALS.seen()
        raise
    _SIGNALS.deferring -= 1
    _SIGNALS.checkpoint()


# ----------------------------------------------------------------------------- owners


def _short_hash(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


@functools.lru_cache(maxsize=1)
def _host() -> str:
    """This machine, as far as process ids go: the host name and the pid namespace (two
    containers on one host see different processes under the same ids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return _short_hash(f"{socket.gethostname()}|{namespace}", 6)


@functools.lru_cache(maxsize=1)
def _boot() -> str:
    try:
        return _short_hash(Path("/proc/sys/kernel/random/boot_id").read_text().strip(), 4)
    except OSError:
        return "0000"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a running process, from /proc (Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[19])


def _has_proc() -> bool:
    return Path("/proc/self/stat").is_file()


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that made a temporary file or folder: machine, boot, pid, start time."""

    host: str
    boot: str
    pid: int
    start: int  # clock ticks since boot (Linux); 0 where unknown

    PATTERN = r"(?P<host>[0-9a-f]{6})(?P<boot>[0-9a-f]{4})-(?P<pid>\d+)-(?P<start>\d+)"

    @classmethod
    def current(cls) -> "Owner":
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> "Owner":
        """The owner record of a process of this machine (running now)."""
        stat = _proc_stat(pid)
        return cls(_host(), _boot(), pid, stat[1] if stat else 0)

    @property
    def tag(self) -> str:
        return f"{self.host}{self.boot}-{self.pid}-{self.start}"

    def is_alive(self) -> bool | None:
        """True while the process runs, False once it is gone, None where it cannot be told
        (another machine)."""
        if self.host != _host():
            return None
        if _has_proc():
            if self.boot != _boot():
                return False  # the machine rebooted since: every process of that boot is gone
            stat = _proc_stat(self.pid)
            if stat is None:
                return False
            state, start = stat
            return state not in ("Z", "X") and (self.start == 0 or start == self.start)
        try:  # no /proc: the process id alone (a reused id keeps the folder: the safe side)
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        return f"process {self.pid}"


def partial_prefix(name: str, kind: str = "partial") -> str:
    """Prefix for a temporary beside ``name`` (``tempfile.mkstemp/mkdtemp(prefix=...)``):
    ``.NAME.partial-OWNER-``; `clean_stale` recognises what carries it."""
    return f".{name}.{kind}-{Owner.current().tag}-"


_STALE = re.compile(r"^\.(?P<target>.+)\.(?P<kind>partial|old)-" + Owner.PATTERN + r"-(?P<rand>[A-Za-z0-9_]+)$")
# what fsr-export wrote before owners were recorded: ".NAME.partial-XXXXXXXX" (mkdtemp's 8 characters)
_LEGACY = re.compile(r"^\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<rand>[a-z0-9_]{8})$")


@dataclasses.dataclass
class StaleReport:
    """What `clean_stale` did; ``notes()`` gives one line per item, for the user."""

    folder: Path
    removed: list[tuple[str, Owner]] = dataclasses.field(default_factory=list)
    restored: list[tuple[str, str, Owner]] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def notes(self) -> list[str]:
        out = [f"removed {self.folder / n}, left by an interrupted run ({o.describe()}, no longer running)"
               for n, o in self.removed]
        out += [f"restored {self.folder / t} from {self.folder / n}: a run ({o.describe()}) was stopped "
                f"while replacing it" for n, t, o in self.restored]
        out += [f"kept {self.folder / n}: {why}; remove it yourself if no export or build is running"
                for n, why in self.kept]
        out += [f"could not remove {self.folder / n} ({why}); remove it yourself" for n, why in self.failed]
        return out


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def clean_stale(folder: Path, target: str | None = None) -> StaleReport:
    """Remove the temporaries in ``folder`` whose owner process no longer runs.

    Only names this module makes are touched (``.NAME.partial-OWNER-X`` /
    ``.NAME.old-OWNER-X``; with ``target``, only those of ``target``). A ``.old-``
    folder is a replaced output saved aside by the portable two-rename commit; when
    the output itself is missing, it is put back instead of removed. A temporary
    whose process is alive, or whose owner cannot be checked, is never removed.
    """
    folder = Path(folder)
    report = StaleReport(folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return report
    for name in names:
        m = _STALE.match(name)
        if m is None:
            legacy = _LEGACY.match(name)
            if legacy and (target is None or legacy["target"] == target):
                report.kept.append((name, "made by an older fsr-export that did not record its process"))
            continue
        if target is not None and m["target"] != target:
            continue
        owner = Owner(m["host"], m["boot"], int(m["pid"]), int(m["start"]))
        alive = owner.is_alive()
        if alive:
            continue
        if alive is None:
            report.kept.append((name, "made on another machine, whose processes cannot be checked from here"))
            continue
        path, home = folder / name, folder / m["target"]
        try:
            with critical():
                if m["kind"] == "old" and not os.path.lexists(home):
                    os.rename(path, home)
                    report.restored.append((name, m["target"], owner))
                else:
                    _remove(path)
                    report.removed.append((name, owner))
        except OSError as exc:
            report.failed.append((name, exc.strerror or str(exc)))
    return report


# ----------------------------------------------------------------------------- low-level steps


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before it is moved into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


_HELD = threading.local()  # folders this thread holds `locked` on (flock is not re-entrant across fds)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``folder`` itself, held by cooperating fsr
    processes (and threads) around a commit or a manifest update. Re-entrant within a
    thread; creates no file; where the file system does not support it, the block runs
    unlocked."""
    held = _HELD.__dict__.setdefault("folders", {})
    key = os.path.realpath(folder)
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
    held[key] = 1
    try:
        yield
    finally:
        del held[key]
        if fd >= 0:
            os.close(fd)  # closing releases the lock


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """``int renameat2(olddirfd, old, newdirfd, new, flags)`` from libc, or via syscall(2); None elsewhere."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _RENAMEAT2_SYSCALL.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def via_syscall(olddirfd, old, newdirfd, new, flags):
        return syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(old),
                       ctypes.c_int(newdirfd), ctypes.c_char_p(new), ctypes.c_uint(flags))
    return via_syscall


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 with ``flags``; False when this system or file system cannot do it (use
    the fallback), OSError for a real failure (EEXIST for RENAME_NOREPLACE)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists, whoever made it.

    renameat2(RENAME_NOREPLACE) makes that one atomic step; the fallback checks and
    renames under `locked`, which excludes cooperating fsr processes."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    with locked(Path(dst).parent):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)


def exchange(src: Path, dst: Path, aside: Path) -> Path:
    """Put ``src`` at ``dst``; returns where the old ``dst`` is now.

    renameat2(RENAME_EXCHANGE) swaps the two in one atomic step (the old ``dst`` is
    then at ``src``); the fallback renames ``dst`` to ``aside`` (a name that must not
    exist, ``.NAME.old-OWNER-X``), then ``src`` to ``dst``. A SIGKILL between those two
    leaves ``dst`` missing: `clean_stale` puts ``aside`` back."""
    if _rename2(src, dst, _RENAME_EXCHANGE):
        return Path(src)
    os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    return Path(aside)


# ----------------------------------------------------------------------------- errors of the file system

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
PSEUDO_FILESYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                      "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc",
                      "autofs", "nsfs", "rpc_pipefs", "selinuxfs", "hugetlbfs"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux: from /proc/self/mounts), or None."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    where = os.path.realpath(_nearest_existing(path))
    best, kind = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (where == mount or where.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def describe_write_failure(exc: BaseException, place: Path | None = None, what: str = "the output", *,
                           within: Path | None = None) -> str | None:
    """A message for a write that failed because the file system refused it (full,
    read-only, no permission), or None when ``exc`` is another kind of failure.

    ``place`` is the folder being written (default: the file the error names). With
    ``within``, a refused access counts only when the file it names lies inside
    ``within`` (reading an unreadable input elsewhere is not a write failure)."""
    for e in _chain(exc):
        text = str(e)
        code = e.errno if isinstance(e, OSError) else None
        named = getattr(e, "filename", None)
        named = Path(os.fsdecode(named)) if isinstance(named, (str, bytes, os.PathLike)) else None
        where = Path(place) if place is not None else named
        if code in _FULL or any(t in text for t in _FULL_TEXT):
            device = named or where
            free = _free_bytes(_nearest_existing(device)) if device is not None else None
            into = f" into {where}" if where is not None else ""
            left = f" ({_human(free)} free on that device now)" if free is not None else ""
            return (f"no space left on the device while writing {what}{into}{left}: free some space "
                    "or choose a place on another disk")
        if code == errno.EFBIG:
            return (f"a file of {what} is larger than {named or where or 'the file system'} accepts (file system "
                    "limit, or the process's file-size limit: ulimit -f): write it to another file system")
        if code in _DENIED:
            if within is not None and named is not None and not _inside(named, Path(within)):
                return None
            reason = "read-only file system" if code == errno.EROFS else "permission denied"
            at = f" at {named or where}" if (named or where) else ""
            return f"cannot write {what}{at} ({reason}): choose a folder you can write to"
    return None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


@contextlib.contextmanager
def write_errors(place: Path | None = None, what: str = "the output") -> Iterator[None]:
    """Turn a refused write inside the block (disk full, read-only, no permission) into
    `OutputError` naming ``place``; everything else passes through unchanged."""
    try:
        yield
    except FsrError:
        raise
    except Exception as exc:
        message = describe_write_failure(exc, place, what)
        if message is None:
            raise
        raise OutputError(message) from exc


@contextlib.contextmanager
def safe_writes(what: str = "the output", place: Path | None = None, *,
                interrupted: str | None = None) -> Iterator[None]:
    """`signals_as_interrupts` + `write_errors`, as a context manager or a decorator
    (``fsr-build``: ``@safe_writes("TensorRT engines", interrupted="...")``). ``interrupted``
    is the detail an `Interrupted` raised inside gets, when it has none yet."""
    seen = _SIGNALS.raised
    try:
        with signals_as_interrupts(), write_errors(place, what):
            yield
    except Interrupted as exc:
        _SIGNALS.seen()
        if exc.detail is None and interrupted:
            raise Interrupted(exc.signum, interrupted) from None
        raise
    except Exception as exc:
        signum = _SIGNALS.swallowed_since(seen)
        if signum is not None:  # the interrupt came back as a library's error (TensorRT: "build canceled")
            raise Interrupted(signum, interrupted) from exc
        raise


# ----------------------------------------------------------------------------- atomic files


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (other threads may be creating files)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def atomic_write(path: Path, data: bytes | str, *, before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all
    of ``data``, never a part, whatever happens (disk full, SIGKILL, power loss).

    A temporary ``.NAME.partial-OWNER-X`` beside ``path`` is written and fsynced, then
    ``before_replace()`` runs (e.g. the manifest update that records the file), then
    the temporary is renamed over ``path`` and the folder fsynced. The last two steps
    run as one `critical` section. On any failure the temporary is removed and
    ``path`` is untouched; a refused write raises `OutputError`.
    """
    path = Path(path)
    with write_errors(path.parent, str(path.name)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(path.name), dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            with critical():
                if before_replace is not None:
                    before_replace()
                os.replace(tmp, path)
                fsync_dir(path.parent)
        except BaseException:
            with critical():
                Path(tmp).unlink(missing_ok=True)
            raise
    return path


# ----------------------------------------------------------------------------- output folders


def looks_like_export(folder: Path) -> bool:
    """True for a folder fsr-export wrote: its ``manifest.json`` is a JSON object with
    ``format_version`` and ``graphs`` (every manifest format so far has both)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and isinstance(manifest.get("graphs"), dict)


def _contains(folder: Path, inner: Path) -> bool:
    try:
        folder, inner = folder.resolve(), inner.resolve()
    except OSError:
        return False
    return inner == folder or folder in inner.parents


def check_output_folder(output: Path, *, force: bool = False,
                        is_ours: Callable[[Path], bool] = looks_like_export, what: str = "an fsr-export folder",
                        option: str = "--output") -> bool:
    """Refuse an output folder that cannot or may not be written; no side effects.

    Returns True when ``output`` exists (and ``force`` allows replacing it). Refused:
    an existing output without ``force``; with ``force``, anything ``is_ours`` does not
    recognise (a user's folder is never replaced), a symbolic link, a file, a folder
    holding the current working folder (``-o . --force``); a place on a virtual file
    system (/proc, /sys) or one that cannot be written.
    """
    output = Path(output)
    fstype = filesystem_type(output)
    if fstype in PSEUDO_FILESYSTEMS:
        raise OutputError(f"{output} is on the virtual '{fstype}' file system, which cannot hold files: "
                          f"choose an {option} on a disk")
    exists = os.path.lexists(output)
    if exists:
        if not force:
            raise OutputExistsError(f"{output} already exists; pass --force to replace it (only {what} can be "
                                    f"replaced), or choose another {option}")
        if output.is_symlink():
            raise RefusedReplaceError(f"refusing to replace {output}: it is a symbolic link (to "
                                      f"{os.readlink(output)}); pass the folder itself, or choose another {option}")
        if not output.is_dir():
            raise RefusedReplaceError(f"refusing to replace {output}: it is a file, not {what}; remove it "
                                      f"yourself or choose another {option}")
        try:
            cwd = Path.cwd()
        except OSError:
            cwd = None
        if cwd is not None and _contains(output, cwd):
            raise RefusedReplaceError(f"refusing to replace {output}: it holds the current working folder "
                                      f"({cwd}); choose another {option}")
        if not is_ours(output):
            raise RefusedReplaceError(f"refusing to replace {output}: it is not {what} (no fsr-export "
                                      f"manifest.json in it), and --force replaces only those. Remove it yourself "
                                      f"if you mean to, or choose another {option}")
    parent = _nearest_existing(output.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create {output}: {parent} is a file, not a folder; choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _is_read_only(parent) else "permission denied"
        raise OutputError(f"cannot write into {parent} ({reason}): choose a folder you can write to as {option}")
    return exists


def _is_read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class OutputFolder:
    """Write a whole output folder atomically::

        with OutputFolder(output, force=force, note=progress) as out:
            write_everything_into(out.path)      # a temporary folder beside ``output``
            out.commit()                         # one atomic step puts it in place

    Entering checks the place (`check_output_folder`), removes stale temporaries of
    dead processes (``note`` says so), creates ``.NAME.partial-OWNER-X`` beside the
    target and turns SIGTERM/SIGHUP into `Interrupted` (`signals_as_interrupts`).
    ``commit`` fsyncs the tree, then, holding `locked` on the parent: a new output
    appears with `rename_noreplace` (an output that appeared meanwhile, e.g. another
    export to the same place, is not replaced: `OutputExistsError`); an existing one
    (``force``, checked again) is swapped with `exchange` and removed after. Signals
    are deferred during the commit. Leaving the block without a commit removes the
    temporary folder. An interrupt leaves the old output or the new one, and the
    `Interrupted` raised says which; a refused write becomes `OutputError`.
    """

    def __init__(self, output: Path, *, force: bool = False, is_ours: Callable[[Path], bool] = looks_like_export,
                 note: Callable[[str], None] | None = None, what: str = "an fsr-export folder",
                 noun: str = "export", option: str = "--output"):
        self.output = Path(output)
        self.force, self.is_ours, self.what, self.noun, self.option = force, is_ours, what, noun, option
        self.note = note or (lambda text: None)
        self.path: Path | None = None
        self.existed = False
        self.committed = False
        self._seen = 0
        self._written = self.output.parent  # what this block writes into, for telling write failures apart
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> "OutputFolder":
        self.existed = check_output_folder(self.output, force=self.force, is_ours=self.is_ours, what=self.what,
                                           option=self.option)
        self._seen = _SIGNALS.raised
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(signals_as_interrupts())
        try:
            parent = self.output.parent
            with write_errors(parent, f"the {self.noun}"):
                parent.mkdir(parents=True, exist_ok=True)
                stale = clean_stale(parent, self.output.name)
                for line in stale.notes():
                    self.note(line)
                if stale.restored:  # the output is back: check it again
                    self.existed = check_output_folder(self.output, force=self.force, is_ours=self.is_ours,
                                                       what=self.what, option=self.option)
                with critical():
                    self.path = Path(tempfile.mkdtemp(prefix=partial_prefix(self.output.name), dir=parent))
        except BaseException:
            self._signals.close()
            raise
        return self

    def commit(self) -> None:
        if self.path is None or self.committed:
            raise RuntimeError("OutputFolder.commit() outside its block, or twice")
        output, parent = self.output, self.output.parent
        with critical():
            fsync_tree(self.path)
            os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes it private
            with locked(parent):
                if os.path.lexists(output):
                    if not self.force:
                        raise OutputExistsError(
                            f"{output} was created by another process while this {self.noun} ran (another "
                            f"{self.noun} to the same place?); it was left as it is and this {self.noun} was "
                            f"discarded. Run again with --force to replace it, or choose another {self.option}")
                    check_output_folder(output, force=True, is_ours=self.is_ours, what=self.what,
                                        option=self.option)
                    aside = Path(tempfile.mktemp(prefix=partial_prefix(output.name, "old"), dir=parent))
                    self.path = exchange(self.path, output, aside)  # now holds the old output, removed below
                    replaced = True
                else:
                    try:
                        rename_noreplace(self.path, output)
                    except FileExistsError:
                        raise OutputExistsError(
                            f"{output} was created by another process while this {self.noun} ran; it was left "
                            f"as it is and this {self.noun} was discarded. Run again with --force to replace "
                            f"it, or choose another {self.option}") from None
                    self.path = None
                    replaced = False
                self.committed = True
                fsync_dir(parent)
            if replaced:
                try:
                    _remove(self.path)
                except OSError as exc:
                    self.note(f"could not remove the replaced {self.noun} at {self.path} ({exc.strerror}); "
                              "remove it yourself")
                self.path = None

    def __exit__(self, et, ev, tb) -> bool:
        swallowed = _SIGNALS.swallowed_since(self._seen) if et is not None and issubclass(et, Exception) else None
        if et is not None and (issubclass(et, KeyboardInterrupt) or swallowed is not None):
            _SIGNALS.seen()  # this interrupt is being handled here
        try:
            if self.path is not None:
                with critical():
                    shutil.rmtree(self.path, ignore_errors=True)
                self.path = None
        except Interrupted as exc:  # a signal deferred by the clean-up itself
            if et is None:
                et, ev = Interrupted, exc
        finally:
            try:
                self._signals.close()
            except Interrupted as exc:
                if et is None:
                    et, ev = Interrupted, exc
        if et is None:
            return False
        if issubclass(et, KeyboardInterrupt) or swallowed is not None:
            signum = ev.signum if isinstance(ev, Interrupted) else swallowed or signal.SIGINT
            raise Interrupted(signum, self._outcome()) from None
        if issubclass(et, FsrError):
            return False
        if issubclass(et, Exception):
            message = describe_write_failure(ev, self.output.parent, f"the {self.noun}", within=self._written)
            if message is not None:
                raise OutputError(message + self._unchanged()) from ev
        return False

    def _unchanged(self) -> str:
        if self.committed:
            return ""
        return f"; nothing was written ({self.output} is unchanged)" if self.existed else "; nothing was written"

    def _outcome(self) -> str:
        if self.committed:
            return (f"the {self.noun} was already complete and in place at {self.output} when the interrupt came")
        if self.existed:
            return f"the {self.noun} was stopped before it was complete; nothing was written, {self.output} is unchanged"
        return f"the {self.noun} was stopped before it was complete; nothing was written"
