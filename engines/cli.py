"""``fsr-build``: TensorRT engines for every graph of an fsr-export folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


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


def report_table(report) -> Table:
    flavour = "TensorRT-RTX" if report.flavour == "tensorrt_rtx" else "TensorRT"
    table = Table(title=f"fsr-build: {report.export_dir} ({flavour} {report.version})")
    for col in ("engine", "precision", "profiles", "size", "build time", "fp16/bf16 nodes", "TensorRT"):
        table.add_column(col, justify="right" if col in ("size", "build time", "fp16/bf16 nodes") else "left")
    from fsr.engines.profiles import Profile

    for r in report.engines:
        profiles = "\n".join(Profile.from_json(p).describe() for p in r.profiles)
        table.add_row(r.file, r.precision + (" (plugin)" if r.plugin else ""), profiles, _mib(r.size_bytes),
                      f"{r.build_seconds:.1f} s", str(r.low_precision_nodes) if r.precision != "fp32" else "-",
                      f"{r.flavour} {r.version}")
    return table


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
    from fsr.engines.builder import BuildSettings, build_engines
    from fsr.errors import FsrError
    from fsr.engines.loader import EngineBuildError
    from fsr.engines.plugin_graph import PluginError
    from fsr.engines.profiles import ProfileError
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt
    from fsr.export.manifest import ManifestError

    settings = BuildSettings(precision=precision, max_batch=max_batch, max_seq=max_seq, plugin=plugin,
                             plugin_library=plugin_library, timing_cache=timing_cache, graphs=tuple(graph or ()),
                             verbose=verbose)
    try:
        settings.validate()
        trt = import_tensorrt()
        console.print(f"using [bold]{trt.label}[/] (module {trt.flavour})")
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            report = build_engines(export_dir, settings, progress=RichProgress(bar), trt=trt)
    except (FsrError, ManifestError, ProfileError, PluginError, EngineBuildError, TensorRTMissing, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    except KeyboardInterrupt as exc:  # fsr.files.Interrupted says what was kept
        console.print(f"[red]{exc or 'interrupted'}[/]")
        raise typer.Exit(getattr(exc, "exit_code", 130))
    Console().print(report_table(report))
    console.print(f"timing cache: {report.timing_cache}")
    if report.plugin_graph:
        console.print(f"plugin graph: {report.plugin_graph}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"report: {report.report_file}; total {report.total_seconds:.1f} s")


app = typer.Typer(add_completion=False, help="Build TensorRT engines for an fsr-export folder.")
app.command()(build)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
