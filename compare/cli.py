"""``fsr-compare``: does an export compute what the source model computes, and what does pruning cost?

The arguments are checked first (lists, tolerances, samples, the export's manifest, the
places ``--json`` and ``--out`` will be written), then the comparisons are imported (torch,
polygraphy, onnxruntime). Polygraphy's files go to ``--out``, by default ``EXPORT/compare/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from fsr.cli import check_output_file, command, err, exit_program, make_app, run_app, split_list
from fsr.compare.errors import CompareError
from fsr.compare.tolerances import parse_overrides
from fsr.files import atomic_write, check_output_place
from fsr.manifest import read_manifest

app = make_app("Compare an export with its PyTorch source: graph by graph, end to end, pruning fidelity.")


@app.command()
@command
def compare(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    backends: str = typer.Option("torch,ort,trt", help="Comma list: torch (the reference, always run), ort, trt."),
    graphs: Optional[str] = typer.Option(None, help="Comma list of graphs to compare (default: all)."),
    budgets: Optional[str] = typer.Option(None, help="Comma list of budgets for the pruning-fidelity report "
                                                     "(default: the image's token count, i.e. the identity, then "
                                                     "192,128,64)."),
    methods: Optional[str] = typer.Option(None, help="Pruning methods for fidelity (default: every registered "
                                                     "method with a reference)."),
    tol: Optional[List[str]] = typer.Option(
        None, "--tol", help="Per-output tolerance OUTPUT=ATOL,RTOL (glob patterns allowed, e.g. "
                            "'present.*=1e-3,1e-2'); repeatable. Defaults depend on the export's precision."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for Polygraphy JSON inputs/outputs "
                                                          "(default EXPORT_DIR/compare)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Run the pruning-fidelity report."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--no-end-to-end", help="Compare greedy generation."),
    graph_checks: bool = typer.Option(True, "--graph-checks/--no-graph-checks", help="Compare graph by graph."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Add an image (repeatable)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Add a prompt (repeatable, one per --image)."),
    builtin: int = typer.Option(3, "--builtin-samples", min=0, help="Built-in generated (image, prompt) samples."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1),
    near_tie_tol: Optional[float] = typer.Option(None, help="Score gap of the method's decisions that counts as "
                                                            "a near-tie."),
    logit_tol: Optional[float] = typer.Option(None, help="Logit gap that counts as a near-tie end to end."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file hash first (as fsr-run "
                                                                   "does); --no-verify compares graphs changed on "
                                                                   "purpose and lists them as warnings."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Polygraphy's own log."),
) -> None:
    """Compare an export with its PyTorch source: graph by graph through Polygraphy, end to end, and the
    pruning fidelity at several budgets. Exits 1 when any comparison is outside its tolerance."""
    budget_list = tuple(split_list(budgets, "--budgets", int)) or None
    if not (image or prompt or builtin):
        raise CompareError("no samples: pass --image/--prompt or keep --builtin-samples above 0")
    tolerances = parse_overrides(tol)
    read_manifest(export_dir)  # not an export, or a damaged manifest: say so before any heavy import
    if json_path is not None:
        check_output_file(json_path, "--json")  # before minutes of comparisons, not after
    if graph_checks:
        place = out if out is not None else export_dir / "compare"
        check_output_place(place, option="--out", label=f"--out {place}" if out is not None else
                           f"{place} (the default --out)")
    from fsr.compare.report import print_report  # noqa: PLC0415 (heavy: after the arguments are checked)
    from fsr.compare.run import CompareOptions, compare_export  # noqa: PLC0415

    options = CompareOptions(
        backends=tuple(split_list(backends, "--backends")), graphs=tuple(split_list(graphs, "--graphs")) or None,
        budgets=budget_list, methods=tuple(split_list(methods, "--methods")) or None, tolerances=tolerances,
        out_dir=out, graph_checks=graph_checks, end_to_end=end_to_end, fidelity=fidelity, images=tuple(image or ()),
        prompts=tuple(prompt or ()), builtin_samples=builtin, max_new_tokens=max_new_tokens,
        near_tie_tol=near_tie_tol, logit_tol=logit_tol, verbose=verbose, verify=verify)
    with err.status(f"comparing {export_dir}") as status:
        report = compare_export(export_dir, options, progress=lambda step: status.update(step))
    print_report(report, Console())
    if json_path:
        atomic_write(json_path, json.dumps(report, indent=2) + "\n")
        err.print(f"wrote {json_path}", highlight=False)
    if not report["passed"]:
        raise typer.Exit(1)


def main() -> None:
    exit_program(run_app(app, prog_name="fsr-compare"))


if __name__ == "__main__":
    main()
