"""PIO-FVLM's encoder-side stage ("w/ VE") spliced into a traced vision graph.

Before::

    pixel_values -> [vision tower] -> tokens, saliency, early_saliency      (graph outputs)

After::

    pixel_values -> [vision tower] -> tokens ------------------------.
                                      saliency (global map) ---------+-> [encoder stage] -> image_tokens,
                                      early_saliency (local map) ----'                      kept_indices

The stage is `pio_fvlm_fixed.PioEncoderStage` (windowed and global picks, then merging;
tested against `encoder_stage_reference`), traced on its own with the token count and width
of the graph's ``tokens`` and merged in with ``onnx.compose`` (batch dynamic).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx.compose
import onnx_graphsurgeon as gs
import torch

from .pio_fvlm import PioError

PREFIX = "pio_encoder_stage/"


def splice_pio_encoder_stage(graph: gs.Graph, *, keep: int) -> gs.Graph:
    """Consume the graph outputs ``tokens, saliency, early_saliency`` with the encoder-side stage
    keeping ``keep`` (before windows rounding) tokens; outputs ``image_tokens, kept_indices``."""
    from fsr.onnx_io import IR_VERSION, OPSET, quiet_exporter

    from .pio_fvlm_fixed import PioEncoderStage

    by_name = {t.name: t for t in graph.outputs}
    missing = [n for n in ("tokens", "saliency", "early_saliency") if n not in by_name]
    if missing:
        raise PioError(f"cannot splice the encoder-side stage: graph {graph.name!r} lacks output(s) {missing}")
    tokens = by_name["tokens"]
    _, num_tokens, width = tokens.shape
    if not isinstance(num_tokens, int) or not isinstance(width, int):
        raise PioError(f"the encoder-side stage needs a static token count and width, got {tokens.shape}")
    stage = PioEncoderStage(num_visual=num_tokens, keep=keep).eval()
    dtype = {"float32": torch.float32, "float16": torch.float16}[str(tokens.dtype)]
    args = (torch.rand(2, num_tokens), torch.rand(2, num_tokens), torch.randn(2, num_tokens, width).to(dtype))
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp, quiet_exporter():
        program = torch.onnx.export(stage, args, dynamo=True, opset_version=OPSET, input_names=list(stage.INPUTS),
                                    output_names=list(stage.OUTPUTS), dynamic_shapes=tuple({0: batch} for _ in args),
                                    verbose=False)
        path = Path(tmp) / "stage.onnx"
        program.save(str(path))
        tail = onnx.load(path)
    graph.outputs = [by_name["tokens"], by_name["saliency"], by_name["early_saliency"]]
    head = gs.export_onnx(graph)
    head.ir_version = tail.ir_version = IR_VERSION
    merged = onnx.compose.merge_models(
        head, tail, io_map=[("early_saliency", "local_attention"), ("saliency", "global_attention"),
                            ("tokens", "tokens")],
        prefix2=PREFIX, outputs=[PREFIX + "merged", PREFIX + "kept_indices"])
    result = gs.import_onnx(merged)
    outputs = {t.name: t for t in result.outputs}
    image_tokens, kept = outputs[PREFIX + "merged"], outputs[PREFIX + "kept_indices"]
    image_tokens.name, kept.name = "image_tokens", "kept_indices"
    result.outputs = [image_tokens, kept]
    result.cleanup(remove_unused_graph_inputs=True)
    return result
