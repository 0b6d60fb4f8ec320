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
  ``--debug``, which prints the traceback; exit code 3.

Start-up stays fast: this module and the command modules import only typer, rich and the
light vocabulary (``fsr.errors``, ``fsr.settings``, ``fsr.manifest``, the registries);
commands check their arguments first and import torch, transformers, onnxruntime or
TensorRT only after (the deliberate late imports of the CLI modules).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import traceback
import typing
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text

from fsr.errors import FsrError
from fsr.files import signals_as_interrupts

INTERNAL_ERROR = 3
INTERRUPTED = 130

err = Console(stderr=True)
_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("fsr_cli_argv", default=None)


class OptionError(FsrError, ValueError):
    """A command-line value that cannot be parsed; the message names the option and the form."""


def make_app(help: str, *, subcommands: bool = False) -> typer.Typer:
    """A typer app built the way every fsr command is (no completion install, no pretty tracebacks)."""
    return typer.Typer(add_completion=False, no_args_is_help=subcommands, help=help,
                       pretty_exceptions_enable=False)


def print_error(message: str, label: str = "error") -> None:
    err.print(Text(f"{label}: ", style="bold red") + Text(str(message)), highlight=False)


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
            with signals_as_interrupts():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except FsrError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
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
        return getattr(exc, "exit_code", 2)
    finally:
        _ARGV.reset(token)
    return result if isinstance(result, int) else 0


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


def main_for(app: typer.Typer, prog_name: str) -> Callable[[], None]:
    """The ``main()`` a ``pyproject.toml`` script entry point calls."""

    def main() -> None:
        sys.exit(run_app(app, prog_name=prog_name))

    return main
