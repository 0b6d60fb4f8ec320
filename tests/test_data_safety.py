"""Nothing lost, nothing half-written (issue 9, data safety).

Each test sets up the trigger of one of the issue's cases (``--force`` on a user's
folder, two exports to one place, an interrupt inside the commit, SIGTERM / SIGHUP /
SIGKILL during an export, ``fsr-build`` killed mid-write, a full, read-only or virtual
file system) and asserts the new behaviour: a message naming the problem, the old data
intact, nothing left behind. The kill and race cases run real processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fsr import files
from fsr.files import (
    Interrupted, OutputError, OutputExistsError, OutputFolder, Owner, RefusedReplaceError, atomic_write, clean_stale,
    partial_prefix,
)

runner = CliRunner()
IS_LINUX = sys.platform.startswith("linux")


def _text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


def leftovers(folder: Path) -> list[str]:
    """Temporaries of ours (and of the code before owners were recorded) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".partial-" in p.name or ".old-" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def fake_export(folder: Path, tag: str) -> Path:
    """A folder that carries an fsr-export manifest (what --force may replace)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "graphs": {}, "tag": tag}))
    (folder / "graph.onnx").write_bytes(tag.encode() * 100)
    return folder


def tag_of(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["tag"]


def users_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.md").write_text("notes")
    return folder


def dead_owner() -> Owner:
    """The owner record of a process that really ran on this machine and has exited."""
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner.of(proc.pid)
    proc.kill()
    proc.wait()
    return owner


def cli(name: str) -> list[str]:
    """The installed console script next to this Python (the venv's), else the module."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    module = {"fsr-export": "fsr.export.cli", "fsr-build": "fsr.engines.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


# -- --force and the output place ---------------------------------------------------------------


def export_cli(args, **kw):
    from fsr.export.cli import app

    return runner.invoke(app, ["llava", "--method", "none", *args], **kw)


def test_force_refuses_a_users_folder(tmp_path):
    """Before: `fsr-export llava -o DIR --force` deleted any folder. Now only an export is replaced."""
    docs = users_folder(tmp_path / "docs")
    before = snapshot(docs)
    r = export_cli(["-o", str(docs), "--force"])
    assert r.exit_code == 2, r.output
    assert "refusing to replace" in _text(r) and "not an fsr-export folder" in _text(r)
    assert snapshot(docs) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", [".", ".."])
def test_force_refuses_the_working_folder(tmp_path, monkeypatch, where):
    """`-o . --force` (or any folder holding the working folder) is refused, even when it is an export."""
    export = fake_export(tmp_path / "exp", "old")
    (export / "sub").mkdir()
    monkeypatch.chdir(export / "sub" if where == ".." else export)
    before = snapshot(export)
    r = export_cli(["-o", where, "--force"])
    assert r.exit_code == 2 and "holds the current working folder" in _text(r), r.output
    assert snapshot(export) == before


def test_force_refuses_a_symlink_and_a_file(tmp_path):
    target = fake_export(tmp_path / "real", "old")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("data")
    r = export_cli(["-o", str(tmp_path / "link"), "--force"])
    assert r.exit_code == 2 and "symbolic link" in _text(r)
    r = export_cli(["-o", str(tmp_path / "file"), "--force"])
    assert r.exit_code == 2 and "is a file" in _text(r)
    assert tag_of(target) == "old" and (tmp_path / "file").read_text() == "data"


@pytest.mark.parametrize("place", ["/proc/fsr-out", "/proc/self/fsr-out", "/sys/fsr-out"])
def test_virtual_file_systems_are_refused(place):
    if not IS_LINUX or not Path(place).parent.exists():
        pytest.skip("needs Linux /proc and /sys")
    r = export_cli(["-o", place])
    assert r.exit_code == 2 and "virtual" in _text(r) and "choose an --output on a disk" in _text(r), r.output
    assert "Traceback" not in r.output


def test_unwritable_output_is_refused_before_loading(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the read-only mount case is in test_read_only_mount)")
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    r = export_cli(["-o", str(folder / "x")])
    assert r.exit_code == 2 and "permission denied" in _text(r), r.output


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if not IS_LINUX or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_mount(tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("needs root and mount(8) for a read-only tmpfs")
    try:
        r = export_cli(["-o", str(ro / "x")])
        assert r.exit_code == 2 and "read-only file system" in _text(r), r.output
    finally:
        _umount(ro)


# -- the commit -------------------------------------------------------------------------------------


@pytest.fixture(params=["renameat2", "fallback"])
def commit_kind(request, monkeypatch):
    """Both commit paths: renameat2 (Linux) and the portable two renames under a lock."""
    if request.param == "renameat2":
        if files._renameat2() is None:
            pytest.skip("renameat2 is Linux only")
    else:
        monkeypatch.setattr(files, "_rename2", lambda src, dst, flags: False)
    return request.param


def test_commit_new_and_replace(tmp_path, commit_kind):
    out = tmp_path / "out"
    with OutputFolder(out) as o:
        (o.path / "y").mkdir()
        (o.path / "y" / "graph.onnx").write_bytes(b"graph")
        (o.path / "manifest.json").write_text(json.dumps({"format_version": 1, "graphs": {}, "tag": "a"}))
        o.commit()
    assert tag_of(out) == "a" and (out / "y" / "graph.onnx").is_file()
    with OutputFolder(out, force=True) as o:
        (o.path / "manifest.json").write_text(json.dumps({"format_version": 1, "graphs": {}, "tag": "b"}))
        o.commit()
    assert tag_of(out) == "b" and not (out / "y").exists()
    assert leftovers(tmp_path) == [] and oct(out.stat().st_mode & 0o777) == oct(0o777 & ~files._umask())


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path, commit_kind):
    """Two exports to one place: the existence check ran at the start; the commit must not replace."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="created by another process while this export ran"):
        with OutputFolder(out) as o:
            (o.path / "manifest.json").write_text("{}")
            fake_export(out, "first")  # the other export commits first
            o.commit()
    assert tag_of(out) == "first" and leftovers(tmp_path) == []


def test_force_checks_again_at_commit(tmp_path, commit_kind):
    """A user's folder put where an export was, while --force ran, is not replaced."""
    out = fake_export(tmp_path / "out", "old")
    with pytest.raises(RefusedReplaceError):
        with OutputFolder(out, force=True) as o:
            shutil.rmtree(out)
            users_folder(out)
            o.commit()
    assert (out / "thesis.txt").is_file() and leftovers(tmp_path) == []


def test_interrupt_inside_the_commit_is_deferred_and_told_truly(tmp_path, monkeypatch, commit_kind):
    """Before: Ctrl-C between the two renames left no export and the CLI said 'nothing was written'.
    Now the signal waits for the commit; the exception says the new export is in place."""
    out = fake_export(tmp_path / "out", "old")
    real = files.exchange

    def exchange_with_signal(src, dst, aside):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the commit
        time.sleep(0.05)
        return real(src, dst, aside)

    monkeypatch.setattr(files, "exchange", exchange_with_signal)
    with pytest.raises(Interrupted) as info:
        with OutputFolder(out, force=True) as o:
            (o.path / "manifest.json").write_text(json.dumps({"format_version": 1, "graphs": {}, "tag": "new"}))
            o.commit()
    assert info.value.signum == signal.SIGTERM and info.value.exit_code == 143
    assert "already complete and in place" in str(info.value)
    assert tag_of(out) == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupt_before_the_commit_keeps_the_old_export(tmp_path, sig):
    signum = getattr(signal, sig)
    out = fake_export(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt) as info:
        with OutputFolder(out, force=True) as o:
            (o.path / "half.onnx").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signum)
            time.sleep(1)
            o.commit()
    assert isinstance(info.value, Interrupted) and info.value.signum == signum
    assert "nothing was written" in str(info.value) and "is unchanged" in str(info.value)
    assert tag_of(out) == "old" and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_ignored_signals_stay_ignored(tmp_path):
    """Under nohup SIGHUP is ignored: the export must not turn it into an interrupt."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with OutputFolder(tmp_path / "out") as o:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            (o.path / "manifest.json").write_text("{}")
            o.commit()
        assert (tmp_path / "out" / "manifest.json").is_file()
    finally:
        signal.signal(signal.SIGHUP, old)


def _library_callback_that_swallows(signum):
    """What TensorRT does with an exception raised in its logger callback: print and carry on."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(0.5)
    except BaseException:
        pass


def test_an_interrupt_a_library_swallowed_is_raised_at_the_next_checkpoint(tmp_path):
    from fsr.files import safe_writes

    with pytest.raises(Interrupted, match="interrupted by SIGTERM: first file kept"):
        with safe_writes("files", interrupted="first file kept"):
            _library_callback_that_swallows(signal.SIGTERM)
            atomic_write(tmp_path / "a", "1")  # the work in progress finishes, then the interrupt
            atomic_write(tmp_path / "b", "2")
    assert (tmp_path / "a").read_text() == "1" and not (tmp_path / "b").exists()
    assert leftovers(tmp_path) == []


def test_an_interrupt_a_library_turned_into_its_error_is_an_interrupt(tmp_path):
    from fsr.files import safe_writes

    with pytest.raises(Interrupted) as info:
        with safe_writes("engines"):
            _library_callback_that_swallows(signal.SIGHUP)
            raise RuntimeError("Build canceled by user")
    assert info.value.signum == signal.SIGHUP and isinstance(info.value.__cause__, RuntimeError)
    with OutputFolder(tmp_path / "out"), pytest.raises(RuntimeError):  # no interrupt left over afterwards
        raise RuntimeError("an ordinary error stays one")


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from fsr import files
files._rename2 = lambda src, dst, flags: False          # the portable commit: two renames
real, calls = os.rename, []
def rename(src, dst):
    calls.append(dst)
    if len(calls) == 2:                                   # between the two renames
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.rename = rename
with files.OutputFolder(Path(sys.argv[1]), force=True) as o:
    (o.path / "manifest.json").write_text('{"format_version": 1, "graphs": {}, "tag": "new"}')
    o.commit()
"""


def test_sigkill_between_the_two_renames_is_recovered(tmp_path):
    """SIGKILL cannot be deferred: the portable commit killed between its renames leaves the old
    export aside (named for its dead owner); the next run puts it back and says so."""
    out = fake_export(tmp_path / "out", "old")
    r = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and any(".out.old-" in n for n in leftovers(tmp_path))
    notes = []
    with pytest.raises(OutputExistsError):  # restored, so without --force it is refused again
        with OutputFolder(out, note=notes.append):
            pass
    assert tag_of(out) == "old" and leftovers(tmp_path) == []
    assert any(n.startswith("restored") for n in notes) and any(n.startswith("removed") for n in notes), notes


_HOLD_OPEN = """
import sys, time
from pathlib import Path
from fsr import files
try:
    with files.OutputFolder(Path(sys.argv[1]), force=True) as o:
        (o.path / "part.onnx").write_bytes(b"x" * 100000)
        print("ready", flush=True)
        time.sleep(60)
        o.commit()
except KeyboardInterrupt as exc:
    print(exc, flush=True)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_from_outside_clean_up(tmp_path, sig):
    """Before: SIGTERM and SIGHUP left `.NAME.partial-XXXX` behind. Now they take Ctrl-C's path."""
    signum = getattr(signal, sig)
    out = fake_export(tmp_path / "out", "old")
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_OPEN, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert len(leftovers(tmp_path)) == 1
    proc.send_signal(signum)
    message = proc.stdout.read()
    assert proc.wait(30) == 128 + signum
    assert "interrupted by" in message and "nothing was written" in message and "unchanged" in message
    assert tag_of(out) == "old" and leftovers(tmp_path) == []


# -- stale temporaries -----------------------------------------------------------------------------


def test_stale_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = dead_owner()
    stale = tmp_path / f".out.partial-{dead.tag}-abcd1234"
    stale.mkdir()
    (stale / "vision.onnx").write_bytes(b"half")
    stale_file = tmp_path / f".manifest.json.partial-{dead.tag}-zz99yy88"
    stale_file.write_text("{")
    live = subprocess.Popen(["sleep", "30"])
    try:
        alive = tmp_path / f".out.partial-{Owner.of(live.pid).tag}-efgh5678"
        alive.mkdir()
        mine = Path(files.tempfile.mkdtemp(prefix=partial_prefix("out"), dir=tmp_path))
        legacy = tmp_path / ".out.partial-k2j4h5g6"  # fsr-export before owners were recorded
        legacy.mkdir()
        other_host = tmp_path / f".out.partial-ffffff{dead.boot}-1-1-aaaa1111"
        other_host.mkdir()
        report = clean_stale(tmp_path)
        assert not stale.exists() and not stale_file.exists()
        assert alive.exists() and mine.exists() and legacy.exists() and other_host.exists()
        notes = "\n".join(report.notes())
        assert f"process {dead.pid}" in notes and "no longer running" in notes
        assert "older fsr-export" in notes and "another machine" in notes
        assert str(live.pid) not in notes
    finally:
        live.kill()
        live.wait()
    clean_stale(tmp_path)  # now that it has exited, its folder goes too
    assert not alive.exists()


def test_a_reused_process_id_is_not_its_owner(tmp_path):
    """Same pid, other start time: the process that made the folder is gone."""
    me = Owner.current()
    other = Owner(me.host, me.boot, me.pid, me.start + 1)
    assert me.is_alive() is True and other.is_alive() is (False if Path("/proc/self/stat").exists() else True)


# -- atomic files --------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OutputError, match="no space left on the device"):
        atomic_write(path, "new" * 1000)
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        atomic_write(path, "new", before_replace=lambda: (_ for _ in ()).throw(RuntimeError("record failed")))
    assert path.read_text() == "old" and leftovers(tmp_path) == []


# -- fsr-build ----------------------------------------------------------------------------------


def _engines_outside_manifest(export: Path) -> list[str]:
    manifest = json.loads((export / "manifest.json").read_text())
    listed = {e["file"] for e in (manifest.get("engines") or {}).values()}
    return sorted(p.relative_to(export).as_posix() for p in (export / "engines").glob("*.engine")
                  if p.relative_to(export).as_posix() not in listed)


_BUILD_KILLED = """
import os, signal, sys
from fsr import files
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
files.os.replace = replace
from fsr.engines.builder import BuildSettings, build_engines
build_engines(sys.argv[1], BuildSettings(graphs=("embed",)))
"""


@pytest.mark.parametrize("kill_at", [1, 2], ids=["before-manifest", "before-engine-rename"])
def test_build_killed_mid_write_leaves_no_engine_outside_the_manifest(export_none, tmp_path, kill_at):
    """Before: fsr-build killed after writing an engine left it outside the manifest. Now the
    manifest records an engine before the file takes its name; the next build cleans up."""
    pytest.importorskip("tensorrt_rtx")
    from fsr.engines.builder import BuildSettings, build_engines

    export = tmp_path / "export"
    shutil.copytree(export_none, export)
    r = subprocess.run([sys.executable, "-c", _BUILD_KILLED, str(export), str(kill_at)], capture_output=True,
                       text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _engines_outside_manifest(export) == []
    json.loads((export / "manifest.json").read_text())  # whole
    report = build_engines(export, BuildSettings(graphs=("embed",)))
    assert any("left by an interrupted run" in w for w in report.warnings), report.warnings
    assert leftovers(export) == [] and leftovers(export / "engines") == []
    manifest = json.loads((export / "manifest.json").read_text())
    for entry in manifest["engines"].values():
        assert hashlib.sha256((export / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert _engines_outside_manifest(export) == []


def test_real_build_sigterm(export_none, tmp_path):
    """SIGTERM while fsr-build rewrites and builds (TensorRT swallows the exception raised in its
    callbacks): exit 143 with a message, every engine on disk recorded, no temporaries."""
    pytest.importorskip("tensorrt_rtx")
    export = tmp_path / "export"
    shutil.copytree(export_none, export)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([*cli("fsr-build"), str(export), "--precision", "fp16"], stdout=out, stderr=out)
    try:
        assert _wait_for(lambda: (export / "engines").is_dir() and any(
            ".convert.partial-" in n for n in os.listdir(export / "engines")), proc=proc), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(300) == 143, log.read_text()
    finally:
        proc.kill()
    text = re.sub(r"\s+", " ", log.read_text())
    assert "interrupted by SIGTERM: the engines already built are complete" in text and "Traceback" not in text
    assert _engines_outside_manifest(export) == [] and leftovers(export / "engines") == []


def test_build_disk_full_is_a_message(export_none, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    from fsr.engines.cli import app

    export = tmp_path / "export"
    shutil.copytree(export_none, export)
    before = (export / "manifest.json").read_text()
    real = files.os.fsync

    def full(fd):  # the first engine written fills the disk
        if os.fstat(fd).st_size > 10_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    r = runner.invoke(app, [str(export), "--graph", "embed"])
    assert r.exit_code == 2 and "no space left on the device" in _text(r), r.output
    assert (export / "manifest.json").read_text() == before
    assert leftovers(export / "engines") == [] and list((export / "engines").glob("*.engine")) == []


# -- export: disk full (fault injection at the write calls) ------------------------------------------


def test_export_disk_full_while_saving_the_source(tiny_model, tmp_path, monkeypatch):
    """The Rust writer under safetensors reports a full disk as SafetensorError, not OSError."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    from fsr.export import ExportSettings, export_model

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    old = fake_export(tmp_path / "out", "old")
    with pytest.raises(OutputError, match=r"no space left on the device .* nothing was written \(.* is unchanged\)"):
        export_model(tiny_model, old, ExportSettings(method="none"), force=True)
    assert tag_of(old) == "old" and leftovers(tmp_path) == []


def test_export_disk_full_while_writing_a_graph(tiny_model, tmp_path, monkeypatch):
    import onnx_ir

    from fsr.export import ExportSettings, export_model

    def full(model, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_ir, "save", full)  # how fsr.export.trace writes every traced graph
    with pytest.raises(OutputError, match="no space left on the device"):
        export_model(tiny_model, tmp_path / "out", ExportSettings(method="none"))
    assert list(tmp_path.iterdir()) == []


def test_export_disk_full_on_a_small_tmpfs(tmp_path):
    """The real thing, where a small tmpfs can be mounted (root): the export needs ~3.7 MB."""
    full = tmp_path / "full"
    if not _mount_tmpfs(full, "size=2m"):
        pytest.skip("needs root and mount(8) for a small tmpfs")
    try:
        r = subprocess.run([*cli("fsr-export"), "llava", "--method", "none", "-o", str(full / "x")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and "no space left on the device" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and os.listdir(full) == []
    finally:
        _umount(full)


# -- real fsr-export processes: race, SIGKILL then SIGTERM -----------------------------------------------


def _wait_for(predicate, timeout=300.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.1)
    return False


def test_real_export_race_second_export_does_not_replace_the_first(export_none, tmp_path):
    """A real export runs; meanwhile another export lands at the same place (a copy of one).
    The running one must not replace it without --force."""
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([*cli("fsr-export"), "llava", "--method", "none", "-o", str(out)],
                                stdout=err, stderr=err, cwd=tmp_path)
    try:
        assert _wait_for(lambda: leftovers(tmp_path), proc=proc), log.read_text()
        shutil.copytree(export_none, out)  # the other export commits first
        before = snapshot(out)
        assert proc.wait(600) == 2
    finally:
        proc.kill()
    text = re.sub(r"\s+", " ", log.read_text())
    assert "was created by another process while this export ran" in text and "Traceback" not in text
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_real_export_sigkill_then_sigterm(tmp_path):
    """SIGKILL leaves a partial folder (nothing can run); the next export to the same place removes
    it and says so; SIGTERM to that one cleans up and exits 143 with a true message."""
    out = tmp_path / "out"
    cmd = [*cli("fsr-export"), "llava", "--method", "none", "-o", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert _wait_for(lambda: leftovers(tmp_path), proc=first)
    finally:
        first.kill()
        first.wait()
    [stale] = leftovers(tmp_path)
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        second = subprocess.Popen(cmd, stdout=err, stderr=err, cwd=tmp_path)
    try:
        assert _wait_for(lambda: leftovers(tmp_path) and stale not in leftovers(tmp_path), proc=second), \
            log.read_text()
        second.send_signal(signal.SIGTERM)
        assert second.wait(120) == 143
    finally:
        second.kill()
    text = re.sub(r"\s+", " ", log.read_text())
    assert "left by an interrupted run" in text and stale in log.read_text().replace("\n", ""), text
    assert "interrupted by SIGTERM" in text and "nothing was written" in text and "Traceback" not in text
    assert leftovers(tmp_path) == [] and not out.exists()


def test_fault_injection_script_lists_its_cases():
    """tests/fault_injection.py (run by hand: it takes minutes) stays runnable."""
    script = Path(__file__).with_name("fault_injection.py")
    r = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert len(names) == len(set(names)) >= 30
    assert {"force-users-folder", "race-two-exports", "sigterm-during-export", "build-killed-before-engine-rename",
            "disk-full-export-source", "image-bomb-header"} <= set(names)
