"""``fsr-compare``: does an export compute what the source model computes, and what does pruning cost?"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

err = Console(stderr=True)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def compare(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    backends: str = typer.Option("torch,ort,trt", help="Comma list: torch (the reference, always run), ort, trt."),
    graphs: Optional[str] = typer.Option(None, help="Comma list of graphs to compare (default: all)."),
    budgets: str = typer.Option("576,192,128,64", help="Comma list of budgets for the pruning-fidelity report."),
    methods: Optional[str] = typer.Option(None, help="Pruning methods for fidelity (default: all in fsr.pruning)."),
    tol: Optional[List[str]] = typer.Option(
        None, "--tol", help="Per-output tolerance OUTPUT=ATOL,RTOL (glob patterns allowed, e.g. "
                            "'present.*=1e-3,1e-2'); repeatable. Defaults depend on the export's precision."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for Polygraphy JSON inputs/outputs "
                                                          "(default ./fsr-compare/<export name>)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Run the pruning-fidelity report."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--no-end-to-end", help="Compare greedy generation."),
    graph_checks: bool = typer.Option(True, "--graph-checks/--no-graph-checks", help="Compare graph by graph."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Add an image (repeatable)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Add a prompt (repeatable, one per --image)."),
    builtin: int = typer.Option(3, "--builtin-samples", min=0, help="Built-in generated (image, prompt) samples."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1),
    near_tie_tol: Optional[float] = typer.Option(None, help="FSR score gap that counts as a near-tie."),
    logit_tol: Optional[float] = typer.Option(None, help="Logit gap that counts as a near-tie end to end."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Polygraphy's own log."),
) -> None:
    """Compare an export with its PyTorch source: graph by graph through Polygraphy, end to end, and the
    pruning fidelity at several budgets. Exits 1 when any comparison is outside its tolerance."""
    from fsr.compare.report import print_report
    from fsr.compare.run import CompareError, CompareOptions, compare_export
    from fsr.compare.samples import SampleError
    from fsr.compare.tolerances import ToleranceError, parse_overrides
    from fsr.export.manifest import ManifestError
    from fsr.runtime.inputs import InputError

    try:
        try:
            budget_list = tuple(int(b) for b in _split(budgets))
        except ValueError:
            raise CompareError(f"--budgets {budgets!r}: expected integers separated by commas") from None
        if not samples_ok(image, prompt, builtin):
            raise CompareError("no samples: pass --image/--prompt or keep --builtin-samples above 0")
        options = CompareOptions(
            backends=tuple(_split(backends)), graphs=tuple(_split(graphs)) or None, budgets=budget_list,
            methods=tuple(_split(methods)) or None, tolerances=parse_overrides(tol), out_dir=out,
            graph_checks=graph_checks, end_to_end=end_to_end, fidelity=fidelity, images=tuple(image or ()),
            prompts=tuple(prompt or ()), builtin_samples=builtin, max_new_tokens=max_new_tokens,
            near_tie_tol=near_tie_tol, logit_tol=logit_tol, verbose=verbose)
        with err.status(f"comparing {export_dir}") as status:
            report = compare_export(export_dir, options, progress=lambda step: status.update(step))
    except (CompareError, ToleranceError, SampleError, ManifestError, InputError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    print_report(report, Console())
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"]:
        raise typer.Exit(1)


def samples_ok(image, prompt, builtin: int) -> bool:
    return bool(image or prompt or builtin)


def main() -> None:
    typer.run(compare)


if __name__ == "__main__":
    sys.exit(main())
