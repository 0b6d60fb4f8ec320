"""``fsr-run``: image + prompt -> text from an fsr-export folder.

The arguments are checked first (the export's manifest and hashes, the images, the
backend and its options), then the runtime is imported (transformers, onnxruntime or
TensorRT, torch).

Output. Text mode: one image streams its text to standard output as it is generated
(an interrupt loses nothing); a batch prints one line per row when done (what was
generated so far when interrupted). Control characters and terminal escapes in the
generated text are printed as visible escapes (`fsr.cli.printable`). ``--json`` prints
one object, for one image and for a batch alike::

    {"export": "...", "backend": "ort", "random_weights": true,
     "results": [{"token_ids": [...], "text": "...", "kept_indices": [...] | null,
                  "stop": "eos" | "length" | "interrupted"}]}

A run from a random-weight export (a built-in preset) says so on standard error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fsr.cli import command, err, exit_program, make_app, print_note, printable, random_weights_note, run_app
from fsr.engines.records import PRECISIONS
from fsr.errors import InputError
from fsr.manifest import read_manifest
from fsr.runtime.backend import BackendError, backend_names
from fsr.runtime.inputs import load_image

app = make_app("Generate text for an image and a prompt with an exported model.")


class Output:
    """What ``fsr-run`` prints: the text streamed (one row), or collected (a batch, ``--json``),
    and what was generated so far when the run is interrupted."""

    def __init__(self, tokenizer, rows: int, as_json: bool, header: dict):
        self.tokenizer, self.as_json, self.header = tokenizer, as_json, header
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.stream = rows == 1 and not as_json
        self.shown = 0  # characters of row 0 already printed

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def put(self, new: list[int | None]) -> None:
        for row, token in zip(self.ids, new):
            if token is not None:
                row.append(token)
        if self.stream:
            text = self._text(self.ids[0])
            ready = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for its next byte
            if ready > self.shown:
                sys.stdout.write(printable(text[self.shown:ready]))
                sys.stdout.flush()
                self.shown = ready

    def finish(self, results) -> None:
        if self.as_json:
            print(json.dumps({**self.header, "results": [r.to_json() for r in results]}))
        elif self.stream:
            text = results[0].text
            sys.stdout.write(printable(text[self.shown:]) + "\n")
        else:
            for r in results:
                print(printable(r.text))
        sys.stdout.flush()

    def interrupted(self) -> None:
        """Print what was generated before the interrupt."""
        if self.as_json:
            results = [{"token_ids": ids, "text": self._text(ids), "kept_indices": None, "stop": "interrupted"}
                       for ids in self.ids]
            print(json.dumps({**self.header, "results": results}))
        elif self.stream:
            text = self._text(self.ids[0])
            sys.stdout.write(printable(text[self.shown:]) + "\n")
        else:
            for ids in self.ids:
                print(printable(self._text(ids)))
        sys.stdout.flush()


@app.command()
@command
def run(
    export_dir: Path = typer.Argument(..., help="Folder written by fsr-export."),
    image: List[Path] = typer.Option(..., "--image", help="Image file (repeat with --prompt for a batch)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt text (one per --image)."),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as given (must contain the image token)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1,
                                       help="Most tokens to generate (shortened, with a note, to what the model's "
                                            "context leaves after the prompt)."),
    backend: str = typer.Option("ort", help="ort (ONNX Runtime) | trt (TensorRT engines, needs a GPU) | torch "
                                            "(PyTorch modules of source/)."),
    as_json: bool = typer.Option(False, "--json", help='Print one JSON object: {"results": [{"token_ids", "text", '
                                                       '"kept_indices", "stop"}, ...], ...} (one result per '
                                                       '--image).'),
    precision: Optional[str] = typer.Option(None, help="trt: engine precision to use (fp32|fp16|bf16)."),
    plugin: Optional[bool] = typer.Option(None, "--plugin/--no-plugin", help="trt: use the pruning plugin engine."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="trt: capture decode steps in CUDA graphs."),
) -> None:
    """Generate text for an image and a prompt with an exported model (greedy)."""
    if backend not in backend_names():
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
    trt_only = [flag for flag, given in (("--precision", precision is not None), ("--plugin/--no-plugin",
                plugin is not None), ("--cuda-graphs", cuda_graphs)) if given]
    if backend != "trt" and trt_only:
        raise BackendError(f"{', '.join(trt_only)} appl{'ies' if len(trt_only) == 1 else 'y'} to --backend trt "
                           f"only (this run uses --backend {backend})")
    if precision is not None and precision not in PRECISIONS:
        raise BackendError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    manifest = read_manifest(export_dir)  # not an export, or a damaged manifest: say so before any heavy import
    if len(image) != len(prompt):
        raise InputError(f"got {len(image)} --image for {len(prompt)} --prompt; pass one image per prompt")
    images = [load_image(p) for p in image]
    if manifest.model.random_weights:
        print_note(random_weights_note(manifest.model.preset))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own messages name the problems
    from fsr.runtime.pipeline import Pipeline  # noqa: PLC0415 (heavy: after the arguments are checked)

    with err.status(f"loading {export_dir} on {backend}"):
        options = dict(precision=precision, plugin=plugin, cuda_graphs=cuda_graphs) if backend == "trt" else {}
        pipe = Pipeline(export_dir, backend=backend, **options)
    header = {"export": str(export_dir), "backend": backend, "random_weights": manifest.model.random_weights}
    output = Output(pipe.tokenizer, len(images), as_json, header)
    with pipe:
        try:
            results = pipe.generate(images, list(prompt), raw=raw, max_new_tokens=max_new_tokens,
                                    on_tokens=output.put)
        except KeyboardInterrupt:
            output.interrupted()
            raise
    output.finish(results)


def main() -> None:
    exit_program(run_app(app, prog_name="fsr-run"))


if __name__ == "__main__":
    main()
