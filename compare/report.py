"""The terminal report: rich tables over the JSON report ``compare_export`` returns."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

STYLES = {"pass": "green", "near-tie": "yellow", "fail": "bold red", "error": "bold red", "skipped": "dim"}
ORDER = {"pass": 0, "skipped": 0, "near-tie": 1, "fail": 2, "error": 3}


def _status(status: str) -> Text:
    return Text(status, style=STYLES.get(status, ""))


def _num(x) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.2e}"


def graph_table(report: dict) -> Table:
    table = Table(title="Graph by graph (Polygraphy): back end vs PyTorch reference, worst iteration per output",
                  title_justify="left")
    for col in ("graph", "back end", "output", "iters", "max |diff|", "max rel", "max |ref|", "atol", "rtol",
                "status"):
        table.add_column(col, justify="right" if col in ("iters", "max |diff|", "max rel", "max |ref|", "atol",
                                                         "rtol") else "left")
    for g in report["graphs"]:
        if g["status"] == "skipped":
            continue  # one line under the table says why
        if not g["outputs"]:
            table.add_row(g["graph"], g["backend"], "-", "-", "", "", "", "", "", _status(g["status"]))
            table.add_row("", "", Text(g["reason"], style="dim"), *[""] * 7)
            continue
        names = list(dict.fromkeys(o["output"] for o in g["outputs"]))
        for i, name in enumerate(names):
            rows = [o for o in g["outputs"] if o["output"] == name]
            worst = max(rows, key=lambda o: (ORDER.get(o["status"], 0), o["max_absdiff"] or 0.0))
            table.add_row(g["graph"] if i == 0 else "", g["backend"] if i == 0 else "", name, str(len(rows)),
                          _num(max((o["max_absdiff"] or 0.0) for o in rows)),
                          _num(max((o["max_reldiff"] or 0.0) for o in rows)),
                          _num(max((o["reference_max_abs"] or 0.0) for o in rows)),
                          f"{worst['atol']:g}", f"{worst['rtol']:g}", _status(worst["status"]))
            for o in rows:
                if o["note"] and o["status"] != "pass":
                    table.add_row("", "", Text(f"iter {o['iteration']}: {o['note']}", style="dim"), *[""] * 7)
    return table


def e2e_table(report: dict) -> Table:
    table = Table(title="End to end: greedy generation vs PyTorch reference", title_justify="left")
    for col in ("back end", "samples", "identical", "token agreement", "status", "note"):
        table.add_column(col)
    for e in report["end_to_end"]:
        notes = e["reason"] or "; ".join(s["note"] for s in e["sequences"] if s["note"])
        table.add_row(e["backend"], str(len(e["sequences"])) if e["sequences"] else "-",
                      str(e["exact_sequences"]) if e["sequences"] else "-",
                      "-" if e["token_agreement"] is None else f"{e['token_agreement']:.1%}",
                      _status(e["status"]), notes)
    return table


def fidelity_table(report: dict) -> Table:
    f = report["fidelity"]
    table = Table(title=f"Pruning fidelity vs the unpruned model ({f['num_image_tokens']} image tokens; "
                        f"{len(f['unpruned_sequences'])} samples; teacher-forced on its greedy output; "
                        "computed in PyTorch on source/, no re-export)", title_justify="left")
    for col in ("method", "budget", "kept", "first token", "top-1", "KL mean (nats)", "KL max"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in f["rows"]:
        table.add_row(r["method"], str(r["budget"]), str(r["kept_tokens"]), f"{r['first_token_agreement']:.1%}",
                      f"{r['top1_agreement']:.1%}", f"{r['kl_mean']:.4g}", f"{r['kl_max']:.4g}")
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log file: no need to squeeze the tables
    console.print(f"[bold]fsr-compare[/] {report['export']}  method={report['method']} budget={report['budget']} "
                  f"dtype={report['dtype']} relevance={report['relevance']}")
    for warning in report["integrity_warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    if report["graphs"]:
        console.print(graph_table(report))
        if report["commands"]:
            console.print(f"[bold]Reproduce by hand[/] (Polygraphy JSON in {report['output_dir']}):")
            for command in report["commands"]:
                console.print(command, markup=False, highlight=False, soft_wrap=True)
    if report["trt_skipped_reason"]:
        console.print(f"[yellow]TensorRT comparisons skipped:[/] {report['trt_skipped_reason']}")
    if report["end_to_end"]:
        console.print(e2e_table(report))
    if report["fidelity"]:
        console.print(fidelity_table(report))
    if report.get("fidelity_skipped_reason"):
        console.print(f"[yellow]Pruning fidelity skipped:[/] {report['fidelity_skipped_reason']}")
    if report["passed"]:
        console.print(f"[bold green]PASSED[/] in {report['seconds']:.1f} s")
    else:
        console.print(f"[bold red]FAILED[/] ({len(report['failures'])}):")
        for failure in report["failures"]:
            console.print(f"  - {failure}", markup=False, highlight=False)
