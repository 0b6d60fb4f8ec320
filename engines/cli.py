"""``fsr-build``: TensorRT engines for every graph of an fsr-export folder.

The arguments and the export are checked first; the builder (onnx, TensorRT) is imported after.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fsr.cli import command, exit_program, make_app, run_app
from fsr.cli import err as console
from fsr.engines.profiles import Profile, check_limits
from fsr.engines.records import PRECISIONS
from fsr.manifest import read_manifest
from fsr.settings import SettingsError


class RichProgress:
    """`fsr.engines.builder.Progress` drawn with rich: one bar over the engines, the current step."""

    def __init__(self, progress: Progress):
        self.progress, self.task, self.name = progress, None, ""

    def begin(self, total: int) -> None:
        self.task = self.progress.add_task("engines", total=total)

    def engine_started(self, name: str) -> None:
        self.name = name
        self.progress.update(self.task, description=f"[bold]{name}[/]: starting")

    def step(self, text: str) -> None:
        self.progress.update(self.task, description=f"[bold]{self.name}[/]: {text}")

    def engine_done(self, report) -> None:
        self.progress.console.print(f"[green]built[/] {report.file} ({_mib(report.size_bytes)}, "
                                    f"{report.build_seconds:.1f} s)")
        self.progress.update(self.task, advance=1, description="engines")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def report_lines(report) -> list[str]:
    """The build summary as plain lines, one per engine, about 60 characters wide: readable at
    80 columns and in CI logs, never cut (the TensorRT version is in the title line, the
    profiles in `profile_lines`; the fp16/bf16 column appears when an engine has one)."""
    flavour = "TensorRT-RTX" if report.flavour == "tensorrt_rtx" else "TensorRT"
    half = any(r.precision != "fp32" for r in report.engines)
    header = ["engine", "precision", "size", "build"] + (["fp16/bf16 nodes"] if half else [])
    rows = [[Path(r.file).name, r.precision + (" (plugin)" if r.plugin else ""), _mib(r.size_bytes),
             f"{r.build_seconds:.1f} s"] + ([str(r.low_precision_nodes) if r.precision != "fp32" else "-"] if half
                                            else [])
            for r in report.engines]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    return [f"fsr-build: {report.export_dir} ({flavour} {report.version})", line(header), rule,
            *(line(r) for r in rows)]


def profile_lines(report, width: int = 78) -> list[str]:
    """Each engine's optimisation profiles, wrapped to ``width`` columns (the same lines in a
    terminal and in a log)."""
    lines = ["optimisation profiles (min..max, opt):"]
    for r in report.engines:
        for p in r.profiles:
            lines += textwrap.wrap(f"{Path(r.file).name} {Profile.from_json(p).describe()}", width,
                                   initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
    return lines


app = make_app("Build TensorRT engines for an fsr-export folder.")


@app.command()
@command
def build(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (fp16/bf16: matmuls and weights in that type, "
                                                "reductions and FSR scores in fp32)."),
    max_batch: int = typer.Option(4, "--max-batch", min=1, help="Largest batch the engines accept."),
    max_seq: int = typer.Option(2048, "--max-seq", min=2,
                                help="Longest context: prompt (with its image tokens) plus generated tokens."),
    plugin: bool = typer.Option(False, "--plugin", help="Build the vision graph with the FocusScanRefine plugin "
                                                        "(full TensorRT and libfsr_plugin.so)."),
    plugin_library: Optional[Path] = typer.Option(None, "--plugin-library",
                                                  help="libfsr_plugin.so (default: $FSR_PLUGIN_LIBRARY, "
                                                       "build/plugin/, plugin/build/)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache",
                                                help="Timing cache to reuse and update (default "
                                                     "EXPORT/engines/timing.cache; full TensorRT only)."),
    graph: Optional[List[str]] = typer.Option(None, "--graph", help="Build only this graph (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", help="Print TensorRT's log."),
) -> None:
    """Build one TensorRT engine per graph into EXPORT_DIR/engines/ and record them in the manifest."""
    if precision not in PRECISIONS:
        raise SettingsError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    check_limits(max_batch, max_seq)
    read_manifest(export_dir, verify=True)  # an altered export is refused before TensorRT is loaded
    from fsr.engines.builder import BuildSettings, build_engines  # noqa: PLC0415 (heavy: after the checks)
    from fsr.engines.trt_import import import_tensorrt  # noqa: PLC0415

    settings = BuildSettings(precision=precision, max_batch=max_batch, max_seq=max_seq, plugin=plugin,
                             plugin_library=plugin_library, timing_cache=timing_cache, graphs=tuple(graph or ()),
                             verbose=verbose)
    settings.validate()
    trt = import_tensorrt()
    console.print(f"using [bold]{trt.label}[/] (module {trt.flavour})")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        report = build_engines(export_dir, settings, progress=RichProgress(bar), trt=trt)
    out = Console()
    for line in [*report_lines(report), *profile_lines(report)]:
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"timing cache: {report.timing_cache}")
    if report.plugin_graph:
        console.print(f"plugin graph: {report.plugin_graph}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"report: {report.report_file}; total {report.total_seconds:.1f} s")


def main() -> None:
    exit_program(run_app(app, prog_name="fsr-build"))


if __name__ == "__main__":
    sys.exit(main())
