"""The one error base of the tool.

Every *expected* failure (bad input, bad settings, a missing or altered file, a back end
that cannot run here) is an `FsrError`: its message names the problem and the fix, and
the command-line tools print it and exit with `FsrError.exit_code` (2). Anything else
that reaches a CLI is an internal error (a bug): the CLIs say so in one line and show the
traceback only with ``--debug``.

Subclasses keep a standard base as well (``ValueError``, ``RuntimeError``, ...) so that
callers that catch those keep working.
"""

from __future__ import annotations


class FsrError(Exception):
    """An expected failure whose message tells the user what to do."""

    exit_code = 2


class InputError(FsrError, ValueError):
    """A bad image or prompt; the message names the problem and the fix."""


class Note(UserWarning):
    """Something the user should know about a run that still goes ahead (only the first
    frame of an animated image is used, ``--max-new-tokens`` was shortened to fit the
    context, ...). Issued with `warnings.warn`; the command-line tools print it as
    ``note: <message>`` (`fsr.cli.command`), the Python API leaves it to `warnings`."""
