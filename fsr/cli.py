"""One style for the five command-line tools (``fsr-export``, ``fsr-run``, ``fsr-build``,
``fsr-compare``, ``fsr-bench``), all on typer::

    app = make_app("Generate text ...")

    @app.command()
    @command
    def run(export_dir: Path = typer.Argument(...), ...) -> None:
        ...                                   # check arguments (light), then import what is heavy

    def main() -> None:
        sys.exit(run_app(app, prog_name="fsr-run"))

`command` gives every command the same error handling and a ``--debug`` option:

- an expected error (`fsr.errors.FsrError`: bad input, bad settings, an altered export, a
  back end that cannot run here) prints ``error: <message>`` and exits with its exit code (2);
- Ctrl-C, SIGTERM and SIGHUP (`fsr.files.signals_as_interrupts` runs around every command)
  print ``interrupted ...`` with what became of the output, and exit 128 + the signal number
  (130 for Ctrl-C);
- anything else is a bug: ``internal error: <type>: <first line>`` and a pointer to
  ``--debug``, which prints the traceback; exit code 3;
- a `fsr.errors.Note` warning raised during the command (an animated image, a shortened
  ``--max-new-tokens``) is printed as ``note: <message>``, not as a Python warning line.

Boolean options are flags: the help shows no value for them (``--json``, not
``--json <bool>``), and ``--json true`` is answered with what to write instead.

Output files a command writes at the end (``--json``, ``--plot``, ...) are checked with
`check_output_file` before the run, so minutes of results are not lost to a bad path,
and written with `fsr.files.atomic_write`. `printable` makes generated text safe for a
terminal; `random_weights_note` is the line every command prints for a random-weight export.

Start-up stays fast: this module and the command modules import only typer, rich and the
light vocabulary (``fsr.errors``, ``fsr.settings``, ``fsr.manifest``, the registries);
commands check their arguments first and import torch, transformers, onnxruntime or
TensorRT only after (the deliberate late imports of the CLI modules).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import sys
import traceback
import typing
import unicodedata
import warnings
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from fsr.errors import FsrError, Note
from fsr.files import signals_as_interrupts

INTERNAL_ERROR = 3
INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away

err = Console(stderr=True)
_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("fsr_cli_argv", default=None)


class OptionError(FsrError, ValueError):
    """A command-line value that cannot be parsed; the message names the option and the form."""


class _FlagsAsFlags:
    """Boolean flags read as flags in the help: no ``<bool>`` value column (they take none)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class FsrCommand(_FlagsAsFlags, TyperCommand):
    """The click command class of every fsr command."""


class FsrGroup(_FlagsAsFlags, TyperGroup):
    """The click group class of an fsr app with subcommands."""


class FsrApp(typer.Typer):
    """`typer.Typer` whose commands are `FsrCommand` (flags shown as flags)."""

    def command(self, *args: Any, cls=None, **kwargs: Any):
        return super().command(*args, cls=cls or FsrCommand, **kwargs)


def make_app(help: str, *, subcommands: bool = False) -> typer.Typer:
    """A typer app built the way every fsr command is (no completion install, no pretty tracebacks)."""
    return FsrApp(cls=FsrGroup, add_completion=False, no_args_is_help=subcommands, help=help,
                  pretty_exceptions_enable=False)


def print_error(message: str, label: str = "error") -> None:
    err.print(Text(f"{label}: ", style="bold red") + Text(str(message)), highlight=False)


def print_note(message: str) -> None:
    """``note: <message>`` on standard error (something the user should know; the run goes on)."""
    err.print(Text("note: ", style="bold yellow") + Text(str(message)), highlight=False)


@contextlib.contextmanager
def notes_printed() -> Iterator[None]:
    """Inside: `fsr.errors.Note` warnings are printed as ``note: <message>`` (each once per
    place), other warnings as Python prints them."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", Note)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if isinstance(category, type) and issubclass(category, Note):
                print_note(str(message))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


_ESCAPED = frozenset(("Cc", "Cf", "Cs", "Cn", "Zl", "Zp"))  # controls, format, surrogates, unassigned, separators


def printable(text: str) -> str:
    r"""``text`` safe to print on a terminal: control and format characters (escape
    sequences, carriage returns, bidirectional overrides, line separators, ...) become
    visible escapes (``\x1b``, ``\u202e``); newlines and tabs stay."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in _ESCAPED else ascii(c)[1:-1] for c in text)


def random_weights_note(preset: str | None) -> str:
    """What a run from a random-weight export (a built-in preset) must say."""
    what = f"the built-in '{preset}' preset" if preset else "a preset"
    return (f"this export has random weights ({what}): the generated text is meaningless (often byte noise); "
            "that is expected. Export a trained checkpoint with --model PATH for real answers")


def check_output_file(path, option: str) -> None:
    """Refuse (before a long run) an output file ``path`` that could not be written at the
    end: a folder, a place on a virtual file system, under a file, or without write
    permission. See `fsr.files.check_output_file`."""
    from fsr.files import check_output_file as check  # noqa: PLC0415 (the shared rule)

    check(path, option=option)


def _silence_stdout() -> None:
    """After a broken pipe: point standard output at /dev/null so the interpreter's final
    flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a typer command: the shared error handling and a ``--debug`` option (see the module docstring)."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    debug = inspect.Parameter(
        "debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--debug", help="On an internal error, show the full traceback."))

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            with signals_as_interrupts(), notes_printed():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except FsrError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:  # the reader of our output went away (`fsr-run ... | head`): stop quietly
            _silence_stdout()
            raise typer.Exit(BROKEN_PIPE) from None
        except KeyboardInterrupt as exc:  # fsr.files.Interrupted says which signal and what was kept
            err.print(Text(str(exc) or "interrupted: stopped by Ctrl-C", style="bold red"), highlight=False)
            raise typer.Exit(getattr(exc, "exit_code", INTERRUPTED)) from None
        except Exception as exc:  # a bug: one line, the traceback on request
            if debug:
                traceback.print_exc()
            cause = (str(exc).strip().splitlines() or [""])[0]
            print_error(f"{type(exc).__name__}: {cause}", "internal error")
            if not debug:
                err.print("this is a bug in fsr-export; run the command again with --debug to see the traceback",
                          highlight=False)
            raise typer.Exit(INTERNAL_ERROR) from None

    wrapper.__signature__ = signature.replace(
        parameters=[*signature.parameters.values(), debug], return_annotation=signature.return_annotation)
    wrapper.__annotations__ = {**hints, "debug": bool}
    return wrapper


def run_app(app: typer.Typer, argv: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run ``app`` on ``argv`` and return the exit status (usage errors: 2, with typer's message).
    Commands find ``argv`` with `current_argv`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    token = _ARGV.set(argv)
    try:
        result = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print_error("stopped by Ctrl-C", "interrupted")
        return INTERRUPTED
    except typer.TyperException as exc:  # usage errors: bad option, missing argument, ...
        exc.show()
        hint = _flag_value_hint(exc, argv)
        if hint:
            err.print(Text("hint: ", style="bold") + Text(hint), highlight=False)
        return getattr(exc, "exit_code", 2)
    finally:
        _ARGV.reset(token)
    return result if isinstance(result, int) else 0


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _flag_value_hint(exc: Exception, argv: list[str]) -> str | None:
    """``--json true``: say that a flag takes no value (click only reports an extra argument)."""
    message = str(getattr(exc, "message", "") or exc)
    if "unexpected extra argument" not in message:
        return None
    for before, word in zip(argv, argv[1:]):
        if before.startswith("--") and "=" not in before and word.lower() in _BOOL_WORDS:
            return (f"{before} is a flag and takes no value: write {before} alone to turn it on, "
                    "and leave it out to keep it off")
    return None


def current_argv() -> list[str]:
    """The arguments of the running command (those `run_app` got, else the process's)."""
    argv = _ARGV.get()
    return list(sys.argv[1:] if argv is None else argv)


def split_list(value: str | None, option: str, kind: type = str) -> list:
    """``"576, 64"`` -> ``[576, 64]``; OptionError naming ``option`` for anything else."""
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    try:
        return [kind(v) for v in items]
    except ValueError:
        name = {int: "integers", float: "numbers"}.get(kind, "values")
        raise OptionError(f"{option} {value!r}: expected {name} separated by commas") from None


def exit_program(status: int) -> typing.NoReturn:
    """End the process with ``status`` (a command's ``main()``, never a library call).

    Before the interpreter shuts down, every object alive is moved out of the garbage
    collector's reach (`gc.freeze`): the final collection over everything torch and
    transformers created took 1.5 to 3.5 s of every run; finalisers and ``atexit``
    handlers still run."""
    import gc  # noqa: PLC0415

    gc.freeze()
    sys.exit(status)


def main_for(app: typer.Typer, prog_name: str) -> Callable[[], None]:
    """The ``main()`` a ``pyproject.toml`` script entry point calls."""

    def main() -> None:
        exit_program(run_app(app, prog_name=prog_name))

    return main
