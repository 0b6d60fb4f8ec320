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


def random_weights_text(report: dict) -> str | None:
    """What a report on a random-weight export must say about its figures."""
    if not report.get("random_weights"):
        return None
    preset = f" (the built-in '{report['preset']}' preset)" if report.get("preset") else ""
    return (f"this export has random weights{preset}: its generated text is meaningless. The graph and end-to-end "
            "comparisons still check the export exactly (the same random model on both sides); the pruning-fidelity "
            "figures do not rank methods: a random model's next-token distribution is nearly flat, so removing any "
            "image tokens flips its top-1 token by chance (a method at 0 % next to another at 100 % is noise). "
            "Compare a trained checkpoint (fsr-export --model PATH) for fidelity figures that mean something.")


def margin_text(fidelity: dict) -> str | None:
    m = fidelity.get("unpruned_margin")
    if not m:
        return None
    return (f"Unpruned model's confidence: top-1 minus top-2 next-token probability, median {m['median']:.3f} "
            f"(from {m['min']:.3f} to {m['max']:.3f}, {m['steps']} steps); the smaller it is, the more easily any "
            "pruning flips the top-1 token.")


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log file: no need to squeeze the tables
    console.print(f"[bold]fsr-compare[/] {report['export']}  method={report['method']} budget={report['budget']} "
                  f"dtype={report['dtype']} relevance={report['relevance']}")
    for warning in report["integrity_warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    random_weights = random_weights_text(report)
    if random_weights:
        console.print(Text("note: ", style="bold yellow") + Text(random_weights), highlight=False)
    if any(g["status"] != "skipped" for g in report["graphs"]):
        console.print(graph_table(report))
        if report["commands"]:
            console.print(f"[bold]Reproduce by hand[/] (Polygraphy JSON in {report['output_dir']}):")
            for command in report["commands"]:
                console.print(command, markup=False, highlight=False, soft_wrap=True)
    if report["end_to_end"]:
        console.print(e2e_table(report))
    if report["fidelity"]:
        console.print(fidelity_table(report))
        margin = margin_text(report["fidelity"])
        if margin:
            console.print(margin, highlight=False, markup=False)
    if report.get("fidelity_skipped_reason"):
        console.print(f"[yellow]Pruning fidelity skipped:[/] {report['fidelity_skipped_reason']}")
    for skipped in report.get("skipped", []):
        console.print(Text("skipped: ", style="yellow") + Text(skipped), highlight=False)
    if report["passed"]:
        console.print(f"[bold green]PASSED[/] in {report['seconds']:.1f} s" +
                      (f" ({len(report['skipped'])} back end(s) skipped, above)" if report.get("skipped") else ""))
    else:
        console.print(f"[bold red]FAILED[/] ({len(report['failures'])}):")
        for failure in report["failures"]:
            console.print(f"  - {failure}", markup=False, highlight=False)
