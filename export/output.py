"""Where an export is written: a temporary folder beside the target, moved into place at the end.

`prepare_output` refuses to overwrite without ``force`` and returns a fresh temporary
folder; `commit_output` moves the finished export into place (an old one is removed only
after). The exporter calls each exactly once (``exporter.export_model``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fsr.errors import FsrError


class ExportConfigError(FsrError, ValueError):
    """Bad export settings or output; the message names the setting and the fix."""


def prepare_output(output: Path, force: bool) -> Path:
    """Refuse to overwrite without ``force``; return a fresh temporary folder beside ``output``."""
    output = Path(output)
    if output.exists() and not force:
        raise ExportConfigError(f"{output} already exists; pass --force to replace it, or choose another --output")
    if output.exists() and not output.is_dir():
        raise ExportConfigError(f"{output} exists and is not a folder; remove it or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))


def commit_output(tmp: Path, output: Path) -> None:
    """Move the finished export into place; an old one (``--force``) is removed only after."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / "export")
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
