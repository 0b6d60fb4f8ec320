"""``fsr-run``: image + prompt -> text from an fsr-export folder.

The arguments are checked first (the export's manifest and hashes, the images, the
backend), then the runtime is imported (transformers, onnxruntime or TensorRT, torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fsr.cli import command, err, make_app, run_app
from fsr.errors import InputError
from fsr.manifest import read_manifest
from fsr.runtime.backend import BackendError, backend_names
from fsr.runtime.inputs import load_image

app = make_app("Generate text for an image and a prompt with an exported model.")


@app.command()
@command
def run(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    image: List[Path] = typer.Option(..., "--image", help="Image file (repeat with --prompt for a batch)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt text (one per --image)."),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as given (must contain the image token)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    backend: str = typer.Option("ort", help="ort (ONNX Runtime) | trt (TensorRT engines, needs a GPU) | torch "
                                            "(PyTorch modules of source/)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"token_ids": [...], "text": "..."}.'),
    precision: Optional[str] = typer.Option(None, help="trt: engine precision to use (fp32|fp16|bf16)."),
    plugin: Optional[bool] = typer.Option(None, "--plugin/--no-plugin", help="trt: use the pruning plugin engine."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="trt: capture decode steps in CUDA graphs."),
) -> None:
    """Generate text for an image and a prompt with an exported model."""
    if backend not in backend_names():
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
    read_manifest(export_dir)  # not an export, or a damaged manifest: say so before any heavy import
    if len(image) != len(prompt):
        raise InputError(f"got {len(image)} --image for {len(prompt)} --prompt; pass one image per prompt")
    images = [load_image(p) for p in image]
    from fsr.runtime.pipeline import Pipeline  # noqa: PLC0415 (heavy: after the arguments are checked)

    with err.status(f"loading {export_dir} on {backend}"):
        options = dict(precision=precision, plugin=plugin, cuda_graphs=cuda_graphs) if backend == "trt" else {}
        pipe = Pipeline(export_dir, backend=backend, **options)
    with pipe, err.status("generating"):
        results = pipe.generate(images, list(prompt), raw=raw, max_new_tokens=max_new_tokens)
    if as_json:
        payload = [r.to_json() for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload))
    else:
        for r in results:
            print(r.text)


def main() -> None:
    sys.exit(run_app(app, prog_name="fsr-run"))


if __name__ == "__main__":
    main()
