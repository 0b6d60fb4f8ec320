"""Fault injection for issue 9: run every fault and bad-input case, print one table.

    python tests/fault_injection.py                 # every case (about 10 minutes on 2 cores)
    python tests/fault_injection.py -k signal -k force   # cases whose name holds a word
    python tests/fault_injection.py --list          # the cases, without running them
    python tests/fault_injection.py --json out.json # the table as JSON too
    python tests/fault_injection.py --no-mount      # inject full disks even as root

Each case does what a user (or a hostile one, or bad luck) does: real ``fsr-export``,
``fsr-build`` and ``fsr-run`` processes from this environment, real signals, real full
and read-only file systems (small tmpfs mounts, when run as root; otherwise the fault
is injected at the write call and the table says "injected"). Where an exact moment
must be hit (between two renames, between an engine and its manifest entry), a Python
process runs the public API and stops itself there.

The table: case, exit code, the message the user saw, whether the data is safe (the
user's files and any earlier export untouched, no half-written output, nothing left
behind) and a verdict. A case passes when the exit code is the expected one, the
message is clear (no traceback) and the data is safe. The script exits 1 if any case
does not pass.

Adding a case: write a function ``def name(lab: Lab) -> Outcome`` under ``@case(...)``;
`Lab` runs commands, holds a reference export and checks folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path
from typing import Callable

ENV = dict(os.environ, COLUMNS="400", PYTHONUNBUFFERED="1", TERM="dumb")  # one line per message


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Outcome:
    exit_code: int | None
    message: str
    data_safe: bool
    expected: tuple[int, ...]
    detail: str = ""
    traceback: bool = False
    how: str = "real"  # real | injected (the fault simulated at the write call)

    @property
    def passed(self) -> bool:
        return self.exit_code in self.expected and not self.traceback and self.data_safe and (
            self.exit_code == 0 or bool(self.message))


@dataclasses.dataclass
class Case:
    name: str
    group: str
    what: str
    run: Callable[["Lab"], Outcome]


CASES: list[Case] = []


def case(name: str, group: str, what: str):
    def register(fn):
        CASES.append(Case(name, group, what, fn))
        return fn
    return register


# ----------------------------------------------------------------------------- the lab


def _script(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = {"fsr-export": "fsr.export.cli", "fsr-build": "fsr.engines.cli", "fsr-run": "fsr.runtime.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


@dataclasses.dataclass
class Run:
    rc: int | None
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def message_of(text: str) -> str:
    """The line(s) the user reads: errors, interrupts, notes and removals, else the last line."""
    lines = [re.sub(r"\s{3,}\S+\.py:\d+$", "", ln).strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if re.match(r"^(error:|interrupted|warning:|note:|\[.*\] (removed|restored|kept))", ln)
            or re.search(r"(InputNote|removed .* left by|restored )", ln)]
    return " | ".join(keep) if keep else (lines[-1] if lines else "")


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text or "╭─" in text


# a Python process that runs the public API like the CLIs do: message, then the exit code
_PRELUDE = """
import os, signal, sys
from pathlib import Path
def _main(body):
    from fsr.errors import FsrError
    try:
        body()
    except KeyboardInterrupt as exc:
        print(exc, file=sys.stderr, flush=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except FsrError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
"""


class Lab:
    """A scratch folder, the commands, a reference export (made once) and folder checks."""

    def __init__(self, root: Path, mount: bool = True):
        self.root = root
        self._reference: Path | None = None
        self._n = 0
        self.mounts: list[Path] = []
        self.can_mount = mount and sys.platform.startswith("linux") and os.geteuid() == 0 and self._try_mount()

    # -- places
    def folder(self, name: str) -> Path:
        self._n += 1
        path = self.root / f"{self._n:02d}-{name}"
        path.mkdir()
        return path

    def _try_mount(self) -> bool:
        where = self.root / ".mount-probe"
        where.mkdir()
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()
        return ok

    def mount_tmpfs(self, where: Path, options: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
        self.mounts.append(where)

    def umount_all(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        self.mounts.clear()

    # -- commands
    def run(self, cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> Run:
        r = subprocess.run(cmd, cwd=cwd or self.root, env=ENV, capture_output=True, text=True, timeout=timeout)
        return Run(r.returncode, r.stdout, r.stderr)

    def export(self, *args: str, cwd: Path | None = None) -> Run:
        return self.run([*_script("fsr-export"), "llava", "--method", "none", *args], cwd=cwd)

    def start(self, cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=cwd or self.root, env=ENV, stdout=f, stderr=f)

    def python(self, body: str, *args: str, timeout: float = 900) -> Run:
        code = _PRELUDE + textwrap.dedent(body) + "\n_main(main)\n"
        return self.run([sys.executable, "-c", code, *map(str, args)], timeout=timeout)

    # -- the reference export (an export of ours, made once by the real CLI)
    def reference(self) -> Path:
        if self._reference is None:
            out = self.root / "reference"
            r = self.export("-o", str(out))
            if r.rc != 0:
                raise RuntimeError(f"the reference export failed:\n{r.text}")
            self._reference = out
        return self._reference

    def copy_reference(self, dst: Path) -> Path:
        shutil.copytree(self.reference(), dst, symlinks=True)
        return dst

    # -- checks
    @staticmethod
    def snapshot(folder: Path) -> dict[str, str]:
        folder = Path(folder)
        if not folder.exists():
            return {}
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    @staticmethod
    def leftovers(*folders: Path) -> list[str]:
        out = []
        for folder in folders:
            if Path(folder).is_dir():
                out += [n for n in os.listdir(folder) if ".partial-" in n or ".old-" in n or n.startswith(".convert")]
        return sorted(out)

    @staticmethod
    def export_complete(folder: Path) -> bool:
        """A whole export: the tool's own verification (read_manifest(verify=True)) passes."""
        import importlib

        for module in ("fsr.manifest",):  # where the manifest code lives
            try:
                read_manifest = importlib.import_module(module).read_manifest
            except (ImportError, AttributeError):
                continue
            try:
                read_manifest(folder, verify=True)
                return True
            except Exception:
                return False
        raise RuntimeError("no read_manifest found: update Lab.export_complete")

    @staticmethod
    def engines_consistent(export: Path) -> bool:
        """No engine file outside the manifest; every engine the manifest lists has its hash."""
        manifest = json.loads((export / "manifest.json").read_text())
        listed = {e["file"]: e["sha256"] for e in (manifest.get("engines") or {}).values()}
        on_disk = {p.relative_to(export).as_posix() for p in (export / "engines").glob("*.engine")} \
            if (export / "engines").is_dir() else set()
        if on_disk - set(listed):
            return False
        return all(hashlib.sha256((export / f).read_bytes()).hexdigest() == h for f, h in listed.items()
                   if (export / f).exists())

    def wait_for(self, predicate, proc: subprocess.Popen | None = None, timeout: float = 600) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            if proc is not None and proc.poll() is not None:
                return bool(predicate())
            time.sleep(0.1)
        return False


def outcome(run: Run, safe: bool, expected: tuple[int, ...], detail: str = "", how: str = "real") -> Outcome:
    return Outcome(run.rc, message_of(run.text), safe, expected, detail, has_traceback(run.text), how)


# ----------------------------------------------------------------------------- data safety: --force


@case("force-users-folder", "data safety", "fsr-export -o DIR --force, DIR a user's folder")
def _(lab: Lab) -> Outcome:
    docs = lab.folder("force-users") / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("three years of work")
    before = lab.snapshot(docs)
    r = lab.export("-o", str(docs), "--force")
    return outcome(r, lab.snapshot(docs) == before and not lab.leftovers(docs.parent), (2,))


@case("force-cwd", "data safety", "fsr-export -o . --force, inside an export")
def _(lab: Lab) -> Outcome:
    export = lab.copy_reference(lab.folder("force-cwd") / "export")
    before = lab.snapshot(export)
    r = lab.export("-o", ".", "--force", cwd=export)
    return outcome(r, lab.snapshot(export) == before, (2,))


@case("force-parent-of-cwd", "data safety", "fsr-export -o .. --force, from a sub-folder of an export")
def _(lab: Lab) -> Outcome:
    export = lab.copy_reference(lab.folder("force-parent") / "export")
    before = lab.snapshot(export)
    r = lab.export("-o", "..", "--force", cwd=export / "source")
    return outcome(r, lab.snapshot(export) == before, (2,))


@case("force-symlink", "data safety", "fsr-export -o LINK --force, LINK a symbolic link to an export")
def _(lab: Lab) -> Outcome:
    base = lab.folder("force-symlink")
    export = lab.copy_reference(base / "export")
    (base / "link").symlink_to(export)
    before = lab.snapshot(export)
    r = lab.export("-o", str(base / "link"), "--force")
    return outcome(r, lab.snapshot(export) == before and (base / "link").is_symlink(), (2,))


@case("exists-without-force", "data safety", "fsr-export -o EXPORT, EXPORT already there, no --force")
def _(lab: Lab) -> Outcome:
    export = lab.copy_reference(lab.folder("exists") / "export")
    before = lab.snapshot(export)
    r = lab.export("-o", str(export))
    return outcome(r, lab.snapshot(export) == before, (2,))


@case("force-replaces-an-export", "data safety", "fsr-export -o EXPORT --force over an earlier export (control)")
def _(lab: Lab) -> Outcome:
    base = lab.folder("force-export")
    export = lab.copy_reference(base / "export")
    (export / "manifest.json").write_text((export / "manifest.json").read_text().replace('"created": "',
                                                                                       '"created": "old '))
    r = lab.export("-o", str(export), "--force", "--seed", "1")
    fresh = "old " not in (export / "manifest.json").read_text()
    return outcome(r, fresh and lab.export_complete(export) and not lab.leftovers(base), (0,))


# ----------------------------------------------------------------------------- data safety: races


@case("race-two-exports", "data safety", "two fsr-export to one new place at once, no --force")
def _(lab: Lab) -> Outcome:
    base = lab.folder("race")
    out = base / "out"
    procs = [lab.start([*_script("fsr-export"), "llava", "--method", "none", "-o", str(out), "--seed", str(i)],
                       base / f"log{i}.txt") for i in range(2)]
    rcs = [p.wait(1200) for p in procs]
    logs = [(base / f"log{i}.txt").read_text() for i in range(2)]
    loser = [i for i, rc in enumerate(rcs) if rc != 0]
    safe = sorted(rcs) == [0, 2] and lab.export_complete(out) and not lab.leftovers(base)
    text = logs[loser[0]] if loser else logs[1]
    return Outcome(rcs[loser[0]] if loser else rcs[1], message_of(text), safe, (2,), f"exit codes {rcs}",
                   any(has_traceback(t) for t in logs))


# ----------------------------------------------------------------------------- data safety: interrupts


_EXPORT_WITH = """
def main():
    from fsr import files
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model
    {patch}
    export_model(load_model("tiny"), Path(sys.argv[1]), ExportSettings(method="none"), force=True)
"""


@case("interrupt-inside-commit", "data safety", "SIGTERM arriving in the middle of the commit (--force)")
def _(lab: Lab) -> Outcome:
    base = lab.folder("commit-signal")
    export = lab.copy_reference(base / "export")
    old = lab.snapshot(export)
    patch = """
    real = files.exchange
    def exchange(src, dst, aside):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(src, dst, aside)
    files.exchange = exchange
    """
    r = lab.python(_EXPORT_WITH.format(patch=textwrap.indent(textwrap.dedent(patch), "    ").strip()), export)
    replaced = lab.snapshot(export) != old and lab.export_complete(export)
    return outcome(r, replaced and "in place" in r.err and not lab.leftovers(base), (143,),
                   "new export in place, and the message says so")


@case("sigkill-between-renames", "data safety",
      "SIGKILL between the two renames of the portable commit, then the next export")
def _(lab: Lab) -> Outcome:
    base = lab.folder("commit-kill")
    export = lab.copy_reference(base / "export")
    old = lab.snapshot(export)
    patch = """
    files._rename2 = lambda src, dst, flags: False
    real, calls = os.rename, []
    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.rename = rename
    """
    killed = lab.python(_EXPORT_WITH.format(patch=textwrap.indent(textwrap.dedent(patch), "    ").strip()), export)
    aside = lab.leftovers(base)
    r = lab.export("-o", str(export))  # the next export to that place (no --force)
    safe = killed.rc == -signal.SIGKILL and bool(aside) and lab.snapshot(export) == old \
        and not lab.leftovers(base) and "restored" in r.err
    return outcome(r, safe, (2,), f"after the kill: {aside}; the next run restored the old export")


def _signal_case(lab: Lab, sig: signal.Signals, name: str) -> Outcome:
    base = lab.folder(name)
    export = lab.copy_reference(base / "export")
    old = lab.snapshot(export)
    proc = lab.start([*_script("fsr-export"), "llava", "--method", "none", "-o", str(export), "--force"],
                     base / "log.txt")
    try:
        started = lab.wait_for(lambda: lab.leftovers(base), proc)
        time.sleep(2)  # in the middle of tracing
        proc.send_signal(sig)
        rc = proc.wait(300)
    finally:
        proc.kill()
    text = (base / "log.txt").read_text()
    safe = started and lab.snapshot(export) == old and not lab.leftovers(base)
    return Outcome(rc, message_of(text), safe, (128 + sig,), "old export kept", has_traceback(text))


@case("sigterm-during-export", "data safety", "SIGTERM while fsr-export --force writes")
def _(lab: Lab) -> Outcome:
    return _signal_case(lab, signal.SIGTERM, "sigterm")


@case("sighup-during-export", "data safety", "SIGHUP (terminal closed) while fsr-export --force writes")
def _(lab: Lab) -> Outcome:
    return _signal_case(lab, signal.SIGHUP, "sighup")


@case("sigint-during-export", "data safety", "Ctrl-C (SIGINT) while fsr-export --force writes")
def _(lab: Lab) -> Outcome:
    return _signal_case(lab, signal.SIGINT, "sigint")


@case("sigkill-then-next-export", "data safety", "SIGKILL during fsr-export, then the next export to that place")
def _(lab: Lab) -> Outcome:
    base = lab.folder("sigkill")
    out = base / "out"
    cmd = [*_script("fsr-export"), "llava", "--method", "none", "-o", str(out)]
    proc = lab.start(cmd, base / "killed.txt")
    try:
        lab.wait_for(lambda: lab.leftovers(base), proc)
        time.sleep(2)
    finally:
        proc.kill()
        proc.wait()
    stale = lab.leftovers(base)
    r = lab.run(cmd)
    safe = bool(stale) and lab.export_complete(out) and not lab.leftovers(base) and "left by an interrupted" in r.err
    return outcome(r, safe, (0,), f"stale after SIGKILL: {stale}; removed by the next export")


@case("live-partial-kept", "data safety", "cleaning stale temporaries while an export runs")
def _(lab: Lab) -> Outcome:
    base = lab.folder("live")
    proc = lab.start([*_script("fsr-export"), "llava", "--method", "none", "-o", str(base / "out")], base / "log.txt")
    try:
        lab.wait_for(lambda: lab.leftovers(base), proc)
        before = lab.leftovers(base)
        r = lab.python("""
        def main():
            from fsr.files import clean_stale
            print("\\n".join(clean_stale(Path(sys.argv[1])).notes()) or "nothing removed")
        """, base)
        kept = lab.leftovers(base) == before and bool(before)
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    finally:
        proc.kill()
    return outcome(r, kept and not lab.leftovers(base), (0,), "the running export's folder was kept")


# ----------------------------------------------------------------------------- fsr-build


_BUILD_KILLED_AT = """
def main():
    from fsr import files
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    files.os.replace = replace
    from fsr.engines.builder import build_engines
    build_engines(sys.argv[1])
"""


def _build_kill_case(lab: Lab, at: int, name: str) -> Outcome:
    base = lab.folder(name)
    export = lab.copy_reference(base / "export")
    killed = lab.python(_BUILD_KILLED_AT, export, at)
    consistent = lab.engines_consistent(export)
    r = lab.run([*_script("fsr-build"), str(export)])
    safe = killed.rc == -signal.SIGKILL and consistent and lab.engines_consistent(export) \
        and not lab.leftovers(export, export / "engines") and "left by an interrupted run" in r.text
    return outcome(r, safe, (0,), "no engine outside the manifest after the kill; the next build cleaned up")


@case("build-killed-before-manifest", "data safety", "fsr-build SIGKILLed while recording an engine")
def _(lab: Lab) -> Outcome:
    return _build_kill_case(lab, 1, "build-kill-1")


@case("build-killed-before-engine-rename", "data safety",
      "fsr-build SIGKILLed after the manifest entry, before the engine file takes its name")
def _(lab: Lab) -> Outcome:
    return _build_kill_case(lab, 2, "build-kill-2")


@case("build-sigterm", "data safety", "SIGTERM while fsr-build --precision fp16 rewrites and builds a graph")
def _(lab: Lab) -> Outcome:
    base = lab.folder("build-term")
    export = lab.copy_reference(base / "export")
    proc = lab.start([*_script("fsr-build"), str(export), "--precision", "fp16"], base / "log.txt")
    try:
        converting = lab.wait_for(lambda: (export / "engines").is_dir() and any(
            ".convert.partial-" in n for n in os.listdir(export / "engines")), proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(300)
    finally:
        proc.kill()
    text = (base / "log.txt").read_text()
    safe = converting and lab.engines_consistent(export) and not lab.leftovers(export, export / "engines")
    return Outcome(rc, message_of(text), safe, (143,), "", has_traceback(text))


# ----------------------------------------------------------------------------- refused writes


_SIZES = {"source": "1200k", "vision-graph": "3000k", "decoder-graph": "3500k"}


def _disk_full_export(lab: Lab, stage: str) -> Outcome:
    base = lab.folder(f"full-{stage}")
    if lab.can_mount:
        lab.mount_tmpfs(base / "disk", f"size={_SIZES[stage]}")
        r = lab.export("-o", str(base / "disk" / "out"))
        return outcome(r, not os.listdir(base / "disk"), (2,), f"tmpfs of {_SIZES[stage]}")
    patch = {  # no root: the full disk is injected where the real writers report it
        "source": """
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError
    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    mu.safe_save_file = full
    """,
        "vision-graph": """
    import errno, torch
    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    torch.onnx.ONNXProgram.save = full
    """}.get(stage)
    if patch is None:
        return Outcome(None, "skipped: needs root to mount a small tmpfs", True, (None,), how="skipped")
    body = _EXPORT_WITH.replace("force=True", "force=False")
    r = lab.python(body.format(patch=textwrap.indent(textwrap.dedent(patch), "    ").strip()), base / "out")
    return outcome(r, os.listdir(base) == [], (2,), "", how="injected")


@case("disk-full-export-source", "refused writes", "disk full while fsr-export saves the source model")
def _(lab: Lab) -> Outcome:
    return _disk_full_export(lab, "source")


@case("disk-full-export-vision", "refused writes", "disk full while fsr-export writes the vision graph")
def _(lab: Lab) -> Outcome:
    return _disk_full_export(lab, "vision-graph")


@case("disk-full-export-decoder", "refused writes", "disk full while fsr-export writes the decoder graph")
def _(lab: Lab) -> Outcome:
    return _disk_full_export(lab, "decoder-graph")


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@case("disk-full-build", "refused writes", "disk full while fsr-build writes an engine")
def _(lab: Lab) -> Outcome:
    base = lab.folder("full-build")
    if lab.can_mount:
        size = (_du(lab.reference()) + 600 * 1024) // 1024
        lab.mount_tmpfs(base / "disk", f"size={size}k")
        export = lab.copy_reference(base / "disk" / "export")
        before = (export / "manifest.json").read_text()
        r = lab.run([*_script("fsr-build"), str(export)])
        safe = (export / "manifest.json").read_text() == before or lab.engines_consistent(export)
        return outcome(r, safe and not lab.leftovers(export, export / "engines"), (2,), f"tmpfs of {size} KiB")
    export = lab.copy_reference(base / "export")
    r = lab.python("""
    def main():
        import errno
        from fsr import files
        real = files.os.fsync
        def fsync(fd):
            if os.fstat(fd).st_size > 10000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)
        files.os.fsync = fsync
        from fsr.engines.builder import build_engines
        build_engines(sys.argv[1])
    """, export)
    return outcome(r, lab.engines_consistent(export) and not lab.leftovers(export, export / "engines"), (2,),
                   "", how="injected")


@case("read-only-output", "refused writes", "fsr-export into a read-only file system")
def _(lab: Lab) -> Outcome:
    base = lab.folder("read-only")
    if lab.can_mount:
        lab.mount_tmpfs(base / "ro", "ro,size=1m")
        place = base / "ro"
    elif os.geteuid() != 0:
        place = base / "ro"
        place.mkdir(mode=0o555)
    else:
        return Outcome(None, "skipped: root without mount", True, (None,), how="skipped")
    r = lab.export("-o", str(place / "out"))
    return outcome(r, not os.listdir(place), (2,))


@case("read-only-build", "refused writes", "fsr-build on an export on a read-only file system")
def _(lab: Lab) -> Outcome:
    base = lab.folder("read-only-build")
    if not lab.can_mount:
        return Outcome(None, "skipped: needs root to mount a read-only tmpfs", True, (None,), how="skipped")
    disk = base / "disk"
    lab.mount_tmpfs(disk, f"size={(_du(lab.reference()) + 1024 * 1024) // 1024}k")
    export = lab.copy_reference(disk / "export")
    before = lab.snapshot(export)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    r = lab.run([*_script("fsr-build"), str(export)])
    return outcome(r, lab.snapshot(export) == before, (2,))


@case("proc-output", "refused writes", "fsr-export -o /proc/fsr-out")
def _(lab: Lab) -> Outcome:
    return outcome(lab.export("-o", "/proc/fsr-out"), not os.path.exists("/proc/fsr-out"), (2,))


@case("sys-output", "refused writes", "fsr-export -o /sys/fsr-out")
def _(lab: Lab) -> Outcome:
    return outcome(lab.export("-o", "/sys/fsr-out"), not os.path.exists("/sys/fsr-out"), (2,))


@case("output-under-a-file", "refused writes", "fsr-export -o FILE/out (a file where a folder must be)")
def _(lab: Lab) -> Outcome:
    base = lab.folder("under-file")
    (base / "file").write_text("data")
    r = lab.export("-o", str(base / "file" / "out"))
    return outcome(r, (base / "file").read_text() == "data" and not lab.leftovers(base), (2,))


# ----------------------------------------------------------------------------- images


def _png_header(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _fsr_run(lab: Lab, image: Path) -> Run:
    return lab.run([*_script("fsr-run"), str(lab.reference()), "--image", str(image), "--prompt", "What is this?",
                    "--max-new-tokens", "2"])


@case("image-16bit-png", "images", "a 16-bit grey PNG (was clipped: 99.6 % of pixels became 255)")
def _(lab: Lab) -> Outcome:
    import numpy as np
    from PIL import Image

    from fsr.runtime.inputs import load_image

    path = lab.folder("png16") / "grey16.png"
    Image.fromarray(np.linspace(0, 65535, 256 * 256).astype(np.uint16).reshape(256, 256)).save(path)
    white = float((np.asarray(load_image(path)) == 255).mean())
    r = _fsr_run(lab, path)
    return outcome(r, white < 0.01, (0,), f"{white:.1%} of pixels at 255 (was 99.6 %)")


@case("image-animated-gif", "images", "an animated GIF")
def _(lab: Lab) -> Outcome:
    from PIL import Image

    path = lab.folder("gif") / "anim.gif"
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "lime", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r = _fsr_run(lab, path)
    note = " ".join(ln.strip() for ln in r.err.splitlines() if "first frame" in ln)
    o = outcome(r, True, (0,), "passes when the user is told that only the first frame is used")
    o.message = note or "(no word about the other frames)"
    if not note:
        o.expected = ()  # silently using one frame of three is the old behaviour
    return o


@case("image-bomb-header", "images", "a PNG whose header claims 30000x30000")
def _(lab: Lab) -> Outcome:
    return outcome(_fsr_run(lab, _png_header(lab.folder("bomb") / "bomb.png", 30000, 30000)), True, (2,))


@case("image-truncated", "images", "a truncated PNG")
def _(lab: Lab) -> Outcome:
    base = lab.folder("truncated")
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3)).astype(np.uint8)).save(base / "full.png")
    data = (base / "full.png").read_bytes()
    (base / "cut.png").write_bytes(data[: len(data) // 2])
    return outcome(_fsr_run(lab, base / "cut.png"), True, (2,))


@case("image-not-an-image", "images", "a text file given as --image")
def _(lab: Lab) -> Outcome:
    path = lab.folder("not-image") / "notes.png"
    path.write_text("not a picture")
    return outcome(_fsr_run(lab, path), True, (2,))


# ----------------------------------------------------------------------------- main


def _table(rows: list[tuple[Case, Outcome, float]], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fsr fault injection (issue 9)", show_lines=False)
    for col in ("case", "exit", "message", "data safe", "verdict"):
        table.add_column(col, overflow="fold")
    for c, o, seconds in rows:
        verdict = "skipped" if o.how == "skipped" else "pass" if o.passed else "FAIL"
        if o.how == "injected":
            verdict += " (injected)"
        message = (o.message or "").replace(str(root), "$LAB")
        table.add_row(c.name, "-" if o.exit_code is None else str(o.exit_code), message[:300],
                      "yes" if o.data_safe else "NO", verdict)
    Console(width=160).print(table)
    print(f"($LAB = the scratch folder {root})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run the cases whose name holds this word")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-mount", action="store_true",
                        help="inject full disks at the write calls even where a tmpfs could be mounted")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.k or any(k in c.name for k in args.k)]
    if args.list:
        for c in cases:
            print(f"{c.name:36s} {c.group:15s} {c.what}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="fsr-faults-"))
    lab = Lab(root, mount=not args.no_mount)
    rows = []
    try:
        for c in cases:
            start = time.perf_counter()
            try:
                o = c.run(lab)
            except Exception as exc:  # the harness itself failed: show it as a failed case
                o = Outcome(None, f"harness error: {type(exc).__name__}: {exc}", False, (0,))
            finally:
                lab.umount_all()
            rows.append((c, o, time.perf_counter() - start))
            print(f"{'skipped' if o.how == 'skipped' else 'pass' if o.passed else 'FAIL':7s} {c.name} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        lab.umount_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    _table(rows, root)
    ran = [(c, o) for c, o, _ in rows if o.how != "skipped"]
    clear = sum(not o.traceback and (o.exit_code == 0 or bool(o.message)) for _, o in ran)
    print(f"{len(ran)} cases run ({len(rows) - len(ran)} skipped): {sum(o.passed for _, o in ran)} pass; "
          f"{clear} with a clear message, {sum(o.data_safe for _, o in ran)} with the data safe, "
          f"{sum(o.traceback for _, o in ran)} tracebacks; "
          f"{sum(o.how == 'injected' for _, o in ran)} faults injected at the write call")
    if args.json:
        args.json.write_text(json.dumps([dict(case=c.name, group=c.group, what=c.what, seconds=round(s, 1),
                                              **dataclasses.asdict(o), passed=o.passed) for c, o, s in rows],
                                        indent=2) + "\n")
    return 0 if all(o.passed for _, o in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
