"""``fsr-export``: trace a VLM to ONNX with visual-token pruning spliced into the graphs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Export vision-language models to ONNX with visual-token pruning inside the graphs.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Export vision-language models to ONNX with visual-token pruning inside the graphs."""


@app.command()
def llava(
    budget: int = typer.Option(64, help="Image tokens the LLM keeps (of 576); >= 1."),
    method: str = typer.Option("fsr", help="Pruning method: fsr | none."),
    model: Optional[str] = typer.Option(
        None, help="Checkpoint folder, hub id from the local HF cache, or a preset (tiny, small, llava-1.5-7b). "
                   "Default: the built-in 'tiny' preset."),
    clip: Optional[str] = typer.Option(None, help="CLIP checkpoint (text tower) for instruction relevance."),
    relevance: str = typer.Option("auto", help="auto | clip | llm (fallback: LLM input embeddings)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Export folder (default exports/llava-...)."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16."),
    alpha: float = typer.Option(3.0), beta: float = typer.Option(1.0),
    rho: float = typer.Option(0.9), kappa: float = typer.Option(1.0),
    seed: int = typer.Option(0, help="Seed of a preset's random weights."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Export a LLaVA model: vision (+ FSR), token embedding, decoder (prefill + decode), text encoder."""
    from fsr.errors import FsrError
    from fsr.export.llava import ExportSettings, export_llava
    from fsr.files import check_output_folder
    from fsr.models.llava import load_model

    settings = ExportSettings(method=method, budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa,
                              dtype=dtype, relevance=relevance)
    try:
        settings.validate()
        name = model or "tiny"
        if output is None:
            tag = "none" if method == "none" else f"{method}-b{budget}"
            output = Path("exports") / f"llava-{Path(name).name}-{tag}"
        check_output_folder(output, force=force)  # before loading anything; checked again when writing
        if model is None:
            console.print("[bold]--model not given: using the built-in 'tiny' preset[/] "
                          f"(random weights, seed {seed}, LLaVA-1.5 geometry)")
        start = time.perf_counter()
        with console.status("loading the model") as status:
            loaded = load_model(model, clip=clip, seed=seed)

            def progress(step: str) -> None:
                console.log(step)
                status.update(step)

            export_llava(loaded, output, settings, force=force, progress=progress)
    except FsrError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    except KeyboardInterrupt as exc:  # fsr.files.Interrupted says what became of the output
        console.print(f"[red]{exc or 'interrupted: nothing was written'}[/]")
        raise typer.Exit(getattr(exc, "exit_code", 130))
    console.print(f"[green]exported[/] {output} in {time.perf_counter() - start:.1f} s "
                  f"(method {method}, budget {budget if method != 'none' else 'all'}, {dtype})")


def main() -> None:
    app(prog_name="fsr-export")


if __name__ == "__main__":
    sys.exit(main())
