"""Export a LLaVA model to ONNX graphs with FocusScanRefine spliced into the vision graph.

The export folder::

    manifest.json        what is here, how it was made, hashes
    source/              the source model as a standard HF checkpoint (+ processor, + clip/)
    vision.onnx          pixels (+ instruction embedding) -> image_tokens [B,K,H] (+ kept_indices)
    embed.onnx           token ids -> LLM input embeddings
    decoder.onnx         prefill and decode: embeddings, mask, positions, past KV -> logits, present KV
    text_encoder.onnx    CLIP text tower (only when relevance comes from CLIP)

Everything is written into a temporary folder beside the target and moved into place
at the end (`fsr.files.OutputFolder`), so a failure or an interrupt never leaves a
half-written export behind, and ``force`` replaces only an earlier export.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs
import torch

from fsr.errors import FsrError
from fsr.files import OutputFolder
from fsr.export.manifest import FORMAT_VERSION, graph_entry, package_versions, write_manifest
from fsr.export.trace import trace_to_onnx
from fsr.onnx_io import save_onnx
from fsr.graph_passes import finalize, select_outputs, splice_focus_scan_refine
from fsr.models.llava import (
    CLIP_MAX_TOKENS, ClipTextEncoder, DecoderStep, LoadedModel, TokenEmbedding, VisionPrefix,
    past_names, present_names, save_source,
)

METHODS = ("fsr", "none")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
RELEVANCE = ("auto", "clip", "llm")


class ExportConfigError(FsrError, ValueError):
    """Bad export settings; the message names the setting and the fix."""


@dataclasses.dataclass
class ExportSettings:
    method: str = "fsr"
    budget: int = 64
    alpha: float = 3.0
    beta: float = 1.0
    rho: float = 0.9
    kappa: float = 1.0
    dtype: str = "fp32"
    relevance: str = "auto"  # auto: CLIP when the model has a CLIP text tower, else llm fallback
    decoder_splits: tuple[int, ...] = ()  # LLM layer indices where the decoder is cut into segments

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ExportConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "none" and (not isinstance(self.budget, int) or self.budget < 1):
            raise ExportConfigError(
                f"budget must be an integer >= 1 (got {self.budget!r}): it is the number of image tokens "
                "the LLM keeps; use --method none to export without pruning")
        if self.dtype not in DTYPES:
            raise ExportConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.relevance not in RELEVANCE:
            raise ExportConfigError(f"unknown relevance {self.relevance!r}; choose one of {', '.join(RELEVANCE)}")
        if not 0 < self.rho <= 1:
            raise ExportConfigError(f"rho must be in (0, 1] (got {self.rho})")
        if self.kappa < 0 or self.alpha < 0 or self.beta < 0:
            raise ExportConfigError("alpha, beta and kappa must be >= 0")


def _noop(step: str) -> None:
    pass


def export_llava(loaded: LoadedModel, output: Path, settings: ExportSettings, *, force: bool = False,
                 progress: Callable[[str], None] = _noop) -> Path:
    """Export ``loaded`` into ``output`` (atomically: `fsr.files.OutputFolder`). Returns the export folder."""
    settings.validate()
    output = Path(output)
    with OutputFolder(output, force=force, note=progress) as out:
        _export_into(loaded, out.path, settings, progress)
        progress("moving the export into place")
        out.commit()
    return output


def relevance_source(loaded: LoadedModel, settings: ExportSettings) -> str | None:
    if settings.method == "none":
        return None
    if settings.relevance == "clip" and loaded.clip is None:
        raise ExportConfigError(
            "--relevance clip needs a CLIP model with a text tower: pass --clip PATH (the CLIP checkpoint the "
            "vision tower came from) or use --relevance llm")
    if settings.relevance == "llm" or loaded.clip is None:
        return "llm-embedding-mean"
    return "clip"


def _export_into(loaded: LoadedModel, root: Path, settings: ExportSettings, progress) -> None:
    dtype = DTYPES[settings.dtype]
    if next(loaded.llava.parameters()).dtype != dtype:  # leave the caller's model as it was
        loaded = dataclasses.replace(loaded, llava=copy.deepcopy(loaded.llava).to(dtype),
                                     clip=copy.deepcopy(loaded.clip).to(dtype) if loaded.clip is not None else None)
    llava, clip = loaded.llava, loaded.clip
    text_cfg = llava.config.text_config
    relevance = relevance_source(loaded, settings)

    progress("saving the source model (HF checkpoint + processor)")
    save_source(loaded, root / "source")

    graphs: dict[str, Path] = {}
    progress("tracing the vision graph")
    graphs["vision"] = _export_vision(llava, clip if relevance == "clip" else None, root, settings, relevance)

    progress("tracing the token-embedding graph")
    graphs["embed"] = root / "embed.onnx"
    trace_to_onnx(TokenEmbedding(llava), (torch.tensor([[1, 2, 3], [4, 5, 6]]),), graphs["embed"],
                  input_names=["input_ids"], output_names=["inputs_embeds"],
                  dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},))

    if relevance == "clip":
        progress("tracing the CLIP text-encoder graph")
        graphs["text_encoder"] = root / "text_encoder.onnx"
        ids = torch.ones(2, CLIP_MAX_TOKENS, dtype=torch.long)
        trace_to_onnx(ClipTextEncoder(clip), (ids, torch.ones_like(ids)), graphs["text_encoder"],
                      input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
                      dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}))

    segments = []
    bounds = [0, *settings.decoder_splits, text_cfg.num_hidden_layers]
    for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = "decoder" if len(bounds) == 2 else f"decoder_{s}"
        progress(f"tracing the {name} graph (LLM layers {start}..{stop - 1}, prefill + decode)")
        graphs[name] = root / f"{name}.onnx"
        _export_decoder(llava, start, stop, graphs[name], dtype)
        segments.append({"graph": name, "layers": [start, stop]})

    progress("checking every graph (onnx.checker, full)")
    for path in graphs.values():
        onnx.checker.check_model(str(path), full_check=True)

    progress("writing manifest.json")
    n_image = _num_image_tokens(llava)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": "llava",
        "model": {"source": loaded.source, "path": loaded.path, "preset": loaded.preset},
        "source_model": "source",
        "method": settings.method,
        "budget": settings.budget if settings.method != "none" else None,
        "fsr": ({k: getattr(settings, k) for k in ("alpha", "beta", "rho", "kappa")}
                if settings.method == "fsr" else None),
        "dtype": settings.dtype,
        "relevance": {"source": relevance, "text_max_tokens": CLIP_MAX_TOKENS if relevance == "clip" else None,
                      "clip_model": "source/clip" if relevance == "clip" else None},
        "num_image_tokens": n_image,
        "kept_image_tokens": n_image if settings.method == "none" else min(settings.budget, n_image),
        "image_token_id": llava.config.image_token_id,
        "llm": {
            "num_layers": text_cfg.num_hidden_layers,
            "num_kv_heads": text_cfg.num_key_value_heads,
            "head_dim": getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads,
            "hidden_size": text_cfg.hidden_size,
            "vocab_size": text_cfg.vocab_size,
        },
        "decoder_segments": segments,
        "graphs": {name: graph_entry(path, root) for name, path in graphs.items()},
        "packages": package_versions(),
    }
    write_manifest(root, manifest)


def _num_image_tokens(llava) -> int:
    v = llava.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def _export_vision(llava, clip, root: Path, settings: ExportSettings, relevance: str | None) -> Path:
    v = llava.config.vision_config
    prefix = VisionPrefix(llava, clip)
    embed_dim = clip.config.projection_dim if clip is not None else llava.config.text_config.hidden_size
    dtype = DTYPES[settings.dtype]
    args = (torch.randn(2, 3, v.image_size, v.image_size, dtype=dtype), torch.randn(2, embed_dim, dtype=dtype))
    batch = torch.export.Dim("batch")
    path = root / "vision.onnx"
    trace_to_onnx(prefix, args, path, input_names=["pixel_values", "instruction_embeds"],
                  output_names=["tokens", "features", "saliency", "relevance"],
                  dynamic_shapes=({0: batch}, {0: batch}))
    graph = gs.import_onnx(onnx.load(path))
    if settings.method == "fsr":
        graph = splice_focus_scan_refine(graph, budget=settings.budget, alpha=settings.alpha, beta=settings.beta,
                                         rho=settings.rho, kappa=settings.kappa, use_relevance=relevance is not None)
    else:
        graph = select_outputs(graph, {"tokens": "image_tokens"})
    save_onnx(finalize(graph), path)
    return path


def _export_decoder(llava, start: int, stop: int, path: Path, dtype) -> None:
    cfg = llava.config.text_config
    step = DecoderStep(llava, start, stop)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 3, 4
    layers = range(start, stop)
    past = tuple(torch.randn(b, cfg.num_key_value_heads, p, head_dim, dtype=dtype) for _ in range(2 * len(layers)))
    args = (torch.randn(b, s, cfg.hidden_size, dtype=dtype), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).repeat(b, 1), *past)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in past))
    first = "inputs_embeds" if start == 0 else "hidden_states"
    last = "logits" if step.is_last else "hidden_states_out"
    trace_to_onnx(step, args, path, input_names=[first, "attention_mask", "position_ids", *past_names(layers)],
                  output_names=[last, *present_names(layers)], dynamic_shapes=dynamic)
