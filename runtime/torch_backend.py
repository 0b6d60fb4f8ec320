"""PyTorch backend: an export's graphs run as the PyTorch modules they were traced from.

Each graph of an export maps to the module ``fsr-export`` traced for it (``models/llava.py``):

=============== ==================================================================
``vision``      ``VisionPrefix`` + FocusScanRefine (fixed-shape module, or the readable
                reference); without pruning, the vision tower and projector only
``embed``       ``TokenEmbedding``
``decoder``     ``DecoderStep`` over the segment's LLM layers (prefill and decode)
``text_encoder`` ``ClipTextEncoder`` (when relevance comes from CLIP)
=============== ==================================================================

and two more that exist only here, for benchmarks: ``vision_prefix`` (the tower up to the
four FSR inputs) and ``fsr`` (the op alone). Runners take and return the graphs' input
and output names, so ``Pipeline``'s steps run unchanged; arrays stay ``torch`` tensors
on the backend's device (CPU or CUDA) between steps, as a device backend's should.

Two ways in::

    TorchBackend(export_dir, manifest, device="cuda")        # the export's source/ checkpoint
    TorchBackend.from_model(loaded, model_manifest(loaded, method="fsr", budget=64), device="cuda")

The second needs no export folder: the ``llava-1.5-7b`` preset can be built straight on
the GPU in fp16 (`build_model`) and benchmarked without 14 GB of ONNX on disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsr.runtime.backend import Backend, BackendError, Runner

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
FSR_IMPLEMENTATIONS = ("fixed", "reference")


# ----------------------------------------------------------------------------- modules


class VisionTokens(nn.Module):
    """The unpruned vision graph: tower up to the selected layer, then the projector."""

    def __init__(self, prefix: nn.Module):
        super().__init__()
        self.prefix = prefix

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        h = p.pre_layrnorm(p.embeddings(pixel_values))
        for layer in p.layers:
            h = layer(h, None)
        return p.projector(h[:, 1:])


class FocusScanRefineOp(nn.Module):
    """The op alone: ``tokens, features, saliency[, relevance] -> pruned, kept_indices``."""

    def __init__(self, budget: int, fsr: dict | None = None, implementation: str = "fixed"):
        super().__init__()
        if implementation not in FSR_IMPLEMENTATIONS:
            raise BackendError(f"unknown FSR implementation {implementation!r}; "
                               f"choose one of {', '.join(FSR_IMPLEMENTATIONS)}")
        self.settings = {k: float(v) for k, v in (fsr or {}).items() if k in ("alpha", "beta", "rho", "kappa")}
        self.budget, self.implementation = int(budget), implementation
        if implementation == "fixed":
            from fsr.pruning.fsr_fixed import FocusScanRefineFixed

            self.fixed = FocusScanRefineFixed(self.budget, **self.settings)

    def forward(self, tokens, features, saliency, relevance=None):
        if self.implementation == "fixed":
            return self.fixed(tokens, features, saliency, relevance)
        from fsr.pruning.fsr_reference import focus_scan_refine_reference

        return focus_scan_refine_reference(tokens, features, saliency, relevance, budget=self.budget,
                                           **self.settings)


class VisionWithFSR(nn.Module):
    """The pruned vision graph: ``VisionPrefix`` followed by the op."""

    def __init__(self, prefix: nn.Module, op: nn.Module, use_relevance: bool):
        super().__init__()
        self.prefix, self.op, self.use_relevance = prefix, op, use_relevance

    def forward(self, pixel_values: torch.Tensor, instruction_embeds: torch.Tensor):
        tokens, features, saliency, relevance = self.prefix(pixel_values, instruction_embeds)
        return self.op(tokens, features, saliency, relevance if self.use_relevance else None)


# ----------------------------------------------------------------------------- runner / backend


class TorchRunner(Runner):
    """Runs one module under ``torch.inference_mode``; inputs by name, outputs by name."""

    def __init__(self, name: str, module: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__(name, Path(f"<torch:{name}>"), input_names, output_names)
        self.module = module

    def activate_impl(self) -> None:
        self.module.eval()

    def infer_impl(self, feed_dict: dict[str, Any]) -> dict[str, Any]:
        with torch.inference_mode():
            out = self.module(*(feed_dict[n] for n in self._inputs))
        if isinstance(out, torch.Tensor):
            out = (out,)
        if len(out) != len(self._outputs):
            raise BackendError(f"module {self.name!r} returned {len(out)} outputs, expected {self._outputs}")
        return dict(zip(self._outputs, out))


class TorchBackend(Backend):
    """Runners over the PyTorch modules of an export (or of a model in memory)."""

    name = "torch"

    def __init__(self, export_dir: Path | None, manifest: dict, device: str | None = None,
                 fsr_implementation: str = "fixed", loaded=None):
        super().__init__(Path(export_dir) if export_dir is not None else Path("."), manifest)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("the torch backend was asked for CUDA but torch sees no GPU here; use --device cpu")
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        self.fsr_implementation = fsr_implementation
        if loaded is None:
            if export_dir is None:
                raise BackendError("TorchBackend needs an export folder or a loaded model")
            from fsr.models.llava import load_model

            loaded = load_model(str(Path(export_dir) / manifest["source_model"]), dtype=self.dtype)
        self.loaded = loaded
        self.llava = loaded.llava.to(device=self.device, dtype=self.dtype).eval()
        relevance = (manifest.get("relevance") or {}).get("source")
        self.relevance = relevance if manifest["method"] != "none" else None
        clip = None
        if self.relevance == "clip":
            if loaded.clip is None:
                raise BackendError("this export's relevance comes from CLIP, but the model has no CLIP text tower")
            clip = loaded.clip.to(device=self.device, dtype=self.dtype).eval()
        self.clip = clip
        self._modules: dict[str, nn.Module] = {}

    @classmethod
    def from_model(cls, loaded, manifest: dict, device: str | None = None, **options) -> "TorchBackend":
        """A backend over a model already in memory (``manifest`` from `model_manifest`)."""
        return cls(None, manifest, device=device, loaded=loaded, **options)

    # -- graphs ---------------------------------------------------------------------------

    def _prefix(self) -> nn.Module:
        from fsr.models.llava import VisionPrefix

        if "vision_prefix" not in self._modules:
            self._modules["vision_prefix"] = VisionPrefix(self.llava, self.clip).eval()
        return self._modules["vision_prefix"]

    def _op(self) -> nn.Module:
        if "fsr" not in self._modules:
            if self.manifest["method"] != "fsr":
                raise BackendError(f"method {self.manifest['method']!r} has no FocusScanRefine op")
            self._modules["fsr"] = FocusScanRefineOp(self.manifest["budget"], self.manifest.get("fsr"),
                                                     self.fsr_implementation)
        return self._modules["fsr"]

    def runner(self, graph: str) -> TorchRunner:
        from fsr.models.llava import ClipTextEncoder, DecoderStep, TokenEmbedding, past_names, present_names

        method = self.manifest["method"]
        if graph == "vision":
            if method == "none":
                return TorchRunner(graph, VisionTokens(self._prefix()), ["pixel_values"], ["image_tokens"])
            return TorchRunner(graph, VisionWithFSR(self._prefix(), self._op(), self.relevance is not None),
                               ["pixel_values", "instruction_embeds"], ["image_tokens", "kept_indices"])
        if graph == "vision_prefix":
            return TorchRunner(graph, self._prefix(), ["pixel_values", "instruction_embeds"],
                               ["tokens", "features", "saliency", "relevance"])
        if graph == "fsr":
            names = ["tokens", "features", "saliency"] + (["relevance"] if self.relevance else [])
            return TorchRunner(graph, self._op(), names, ["image_tokens", "kept_indices"])
        if graph == "embed":
            return TorchRunner(graph, TokenEmbedding(self.llava), ["input_ids"], ["inputs_embeds"])
        if graph == "text_encoder":
            if self.clip is None:
                raise BackendError("this model has no text_encoder graph (relevance does not come from CLIP)")
            return TorchRunner(graph, ClipTextEncoder(self.clip), ["input_ids", "attention_mask"], ["text_embeds"])
        for segment in self.manifest["decoder_segments"]:
            if segment["graph"] == graph:
                start, stop = segment["layers"]
                step = DecoderStep(self.llava, start, stop)
                layers = range(start, stop)
                first = "inputs_embeds" if start == 0 else "hidden_states"
                last = "logits" if step.is_last else "hidden_states_out"
                return TorchRunner(graph, step, [first, "attention_mask", "position_ids", *past_names(layers)],
                                   [last, *present_names(layers)])
        raise BackendError(f"the torch backend has no graph {graph!r}")

    # -- arrays ---------------------------------------------------------------------------

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_host(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            array = array.detach()
            if array.dtype == torch.bfloat16:
                array = array.float()
            return array.cpu().numpy()
        return np.asarray(array)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- models in memory


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters in ``dtype`` directly (no fp32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(preset: str, *, device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """A random-weight preset as a ``LoadedModel``, built on ``device`` in ``dtype``.

    Parameters are created in ``dtype`` on ``device`` from the start, so the
    ``llava-1.5-7b`` preset needs about 15 GB of GPU memory in fp16 and never touches
    the CPU's memory; ``device="meta"`` builds the modules without any weights (for
    checks on machines without a GPU).
    """
    from fsr.models.llava import CLIP_MAX_TOKENS, LoadedModel, build_preset
    from fsr.models.tokenizer import build_byte_tokenizer

    torch_dtype = TORCH_DTYPES[dtype]
    with default_dtype(torch_dtype):
        llava, clip, processor = build_preset(preset, seed=seed, dtype=torch_dtype, device=device)
    return LoadedModel(llava, processor, clip, source=f"preset:{preset}", path=None, preset=preset,
                       clip_tokenizer=build_byte_tokenizer(CLIP_MAX_TOKENS))


def model_manifest(loaded, *, method: str, budget: int | None = None, fsr: dict | None = None,
                   dtype: str = "fp32", relevance: str = "auto") -> dict:
    """The parts of an export manifest the pipeline reads, for a model in memory (no export)."""
    from fsr.export.llava import ExportSettings, relevance_source
    from fsr.models.llava import CLIP_MAX_TOKENS

    settings = ExportSettings(method=method, budget=budget if budget is not None else 64, dtype=dtype,
                              relevance=relevance, **(fsr or {}))
    settings.validate()
    cfg = loaded.llava.config
    text = cfg.text_config
    source = relevance_source(loaded, settings)
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    graphs = ["vision", "embed", "decoder"] + (["text_encoder"] if source == "clip" else [])
    return {
        "architecture": "llava",
        "model": {"source": loaded.source, "path": loaded.path, "preset": loaded.preset},
        "method": method,
        "budget": settings.budget if method != "none" else None,
        "fsr": ({k: getattr(settings, k) for k in ("alpha", "beta", "rho", "kappa")} if method == "fsr" else None),
        "dtype": dtype,
        "relevance": {"source": source, "text_max_tokens": CLIP_MAX_TOKENS if source == "clip" else None},
        "num_image_tokens": n_image,
        "kept_image_tokens": n_image if method == "none" else min(settings.budget, n_image),
        "image_token_id": cfg.image_token_id,
        "llm": {
            "num_layers": text.num_hidden_layers,
            "num_kv_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
        },
        "decoder_segments": [{"graph": "decoder", "layers": [0, text.num_hidden_layers]}],
        "graphs": {name: {} for name in graphs},
    }
