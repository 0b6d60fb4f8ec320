"""``fsr-run``: image + prompt -> text from an fsr-export folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def run(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    image: List[Path] = typer.Option(..., "--image", help="Image file (repeat with --prompt for a batch)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt text (one per --image)."),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as given (must contain <image>)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    backend: str = typer.Option("ort", help="ort (ONNX Runtime) | trt (TensorRT engines, needs a GPU) | torch (PyTorch modules of source/)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"token_ids": [...], "text": "..."}.'),
    precision: Optional[str] = typer.Option(None, help="trt: engine precision to use (fp32|fp16|bf16)."),
    plugin: Optional[bool] = typer.Option(None, "--plugin/--no-plugin", help="trt: use the FSR plugin engine."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="trt: capture decode steps in CUDA graphs."),
) -> None:
    """Generate text for an image and a prompt with an exported model."""
    from fsr.export.manifest import ManifestError
    from fsr.runtime.backend import BackendError
    from fsr.runtime.inputs import InputError
    from fsr.runtime.pipeline import Pipeline

    try:
        with console.status(f"loading {export_dir} on {backend}"):
            options = dict(precision=precision, plugin=plugin, cuda_graphs=cuda_graphs) if backend == "trt" else {}
            pipe = Pipeline(export_dir, backend=backend, **options)
        with pipe, console.status("generating"):
            results = pipe.generate(list(image), list(prompt), raw=raw, max_new_tokens=max_new_tokens)
    except (InputError, ManifestError, BackendError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    if as_json:
        payload = [r.to_json() for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload))
    else:
        for r in results:
            print(r.text)


app = typer.Typer(add_completion=False)
app.command(help="Generate text for an image and a prompt with an exported model.")(run)


def main() -> None:
    app(prog_name="fsr-run")


if __name__ == "__main__":
    sys.exit(main())
