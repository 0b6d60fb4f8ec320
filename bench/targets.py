"""What a benchmark runs: one *target* per budget (an export, or a model in memory) on one backend.

A `Target` bundles the pipeline that produces the first token (``Pipeline``'s steps on
the chosen backend) with two extra runners that time the vision graph's parts apart:
``tower`` (the vision graph up to the FocusScanRefine node; the whole vision graph when
nothing is pruned) and ``op`` (the FocusScanRefine op alone).

Targets come from

- export folders (`targets_from_exports`): their manifests say method and budget; the
  baseline is the unpruned export of the same model;
- a preset (`targets_from_preset`): the needed exports are made once into a cache
  folder (``ort`` / ``trt``), or, on the ``torch`` backend, the model is built in memory
  on the device and each budget only swaps the op (no export at all).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from fsr.errors import FsrError
from fsr.bench.analytic import LLMDims, VisionDims

BACKENDS = ("ort", "trt", "torch")


class BenchError(FsrError, ValueError):
    """The benchmark cannot run as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- model facts


@dataclasses.dataclass
class ModelInfo:
    """What the analytic counts need to know about the model under test."""

    source: str
    dtype: str
    llm: LLMDims
    vision: VisionDims
    num_image_tokens: int
    token_dim: int  # FSR tokens width = LLM hidden size (projector output)
    feature_dim: int  # FSR features width = vision hidden size

    @classmethod
    def from_config(cls, llava_config, *, source: str, dtype: str) -> "ModelInfo":
        llm, vision = LLMDims.from_config(llava_config.text_config), VisionDims.from_config(llava_config)
        return cls(source, dtype, llm, vision, vision.num_patches, llm.hidden_size, vision.hidden_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _export_config(export_dir: Path, manifest: dict):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(Path(export_dir) / manifest["source_model"])


def _model_key(manifest: dict) -> tuple:
    model = manifest.get("model") or {}
    return (model.get("source"), model.get("path"), manifest["dtype"], manifest["num_image_tokens"],
            json.dumps(manifest["llm"], sort_keys=True))


# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass
class Target:
    method: str  # "none" or "fsr"
    budget: int | None  # None when unpruned
    kept_tokens: int
    num_image_tokens: int
    backend: str
    pipeline: object  # fsr.runtime.pipeline.Pipeline (or BenchPipeline)
    tower: object | None  # Runner: vision graph up to the op (None: not measurable on this backend)
    op: object | None  # Runner: the op alone (None when unpruned or not measurable)
    export_dir: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return "none" if self.method == "none" else f"{self.method}-b{self.budget}"

    def close(self) -> None:
        for runner in (self.tower, self.op):
            if runner is not None:
                runner.deactivate()
        self.pipeline.close()


@dataclasses.dataclass
class TargetSpec:
    """A target not opened yet (opened when it is measured, and closed after)."""

    method: str
    budget: int | None
    kept_tokens: int
    export_dir: Path | None
    open: Callable[..., Target]  # open(with_parts=True)
    export: dict | None = None  # how the export was obtained (path, reused, seconds)

    @property
    def is_baseline(self) -> bool:
        return self.method == "none"


def _bench_pipeline(manifest: dict, processor, backend, clip_tokenizer=None):
    """``Pipeline``'s steps over parts given directly (a model in memory has no export folder)."""
    from fsr.runtime.pipeline import NP_DTYPES, Pipeline

    class BenchPipeline(Pipeline):
        def __init__(self):  # the parts are given: nothing to read from disk
            self.export_dir = backend.export_dir
            self.manifest = manifest
            self.processor = processor
            self.tokenizer = processor.tokenizer
            self.eos = {self.tokenizer.eos_token_id}
            self.dtype = NP_DTYPES[manifest["dtype"]]
            self.backend = backend
            self.segments = [s["graph"] for s in manifest["decoder_segments"]]
            names = ["vision", "embed", *self.segments] + (["text_encoder"] if "text_encoder" in manifest["graphs"]
                                                          else [])
            self.runners = {n: backend.runner(n).activate() for n in names}
            self.relevance = (manifest.get("relevance") or {}).get("source")
            self.clip_tokenizer = clip_tokenizer
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    return BenchPipeline()


def _kept(manifest: dict) -> int:
    return int(manifest["kept_image_tokens"])


def _method(manifest: dict) -> str:
    """"none" for an export that keeps every image token (an FSR export with budget >= N included)."""
    return "none" if _kept(manifest) >= manifest["num_image_tokens"] else manifest["method"]


def _budget(manifest: dict) -> int | None:
    return None if _method(manifest) == "none" else manifest["budget"]


def open_export(export_dir: Path, backend: str, workdir: Path, *, device: str | None = None,
                fsr_implementation: str = "fixed", with_parts: bool = True,
                backend_options: dict | None = None) -> Target:
    """A target over an export folder on ``backend`` (ort / trt / torch); ``with_parts``: the tower and
    op runners too."""
    from fsr.export.manifest import read_manifest

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    method = _method(manifest)
    notes: list[str] = []
    if backend == "torch":
        from transformers.utils import logging as hf_logging

        from fsr.runtime.torch_backend import TorchBackend

        hf_logging.disable_progress_bar()  # "Loading weights" bars would break the progress display
        torch_backend = TorchBackend(export_dir, manifest, device=device, fsr_implementation=fsr_implementation)
        loaded = torch_backend.loaded
        pipe = _bench_pipeline(manifest, loaded.processor, torch_backend, loaded.clip_tokenizer)
        return _torch_target(pipe, torch_backend, manifest, export_dir, notes, with_parts)

    from fsr.runtime.pipeline import Pipeline

    pipe = Pipeline(export_dir, backend=backend, verify=False, **(backend_options or {}))
    tower = op = None
    if not with_parts:
        pass
    elif method == "none":
        tower = pipe.runners["vision"]
    elif backend == "ort":
        tower, op = _split_runners(export_dir, manifest, workdir)
    else:
        notes.append(f"vision tower and FSR op are not timed apart on the {backend} backend")
    return Target(method, _budget(manifest), _kept(manifest), manifest["num_image_tokens"], backend, pipe,
                  tower, op, export_dir, notes)


def _torch_target(pipe, torch_backend, manifest, export_dir, notes, with_parts: bool = True) -> Target:
    method = _method(manifest)
    if not with_parts:
        tower = op = None
    elif method == "none":
        tower, op = pipe.runners["vision"], None
    else:
        tower = torch_backend.runner("vision_prefix").activate()
        op = torch_backend.runner("fsr").activate()
        notes.append(f"FSR op: PyTorch {torch_backend.fsr_implementation} implementation")
    return Target(method, _budget(manifest), _kept(manifest), manifest["num_image_tokens"], "torch", pipe,
                  tower, op, export_dir, notes)


def _split_runners(export_dir: Path, manifest: dict, workdir: Path):
    """ONNX Runtime runners over the vision graph cut at the FSR node (cached in ``workdir``)."""
    import onnx

    from fsr.bench.split import fsr_op_model, vision_prefix_model
    from fsr.onnx_io import save_onnx
    from fsr.runtime.onnxrt import OnnxRuntimeRunner

    vision = export_dir / manifest["graphs"]["vision"]["file"]
    digest = next(iter(manifest["graphs"]["vision"]["files"].values()))[:16]
    folder = Path(workdir) / f"split-{digest}"
    prefix, op = folder / "vision_prefix.onnx", folder / "fsr_op.onnx"
    if not (prefix.is_file() and op.is_file()):
        model = onnx.load(vision)
        folder.mkdir(parents=True, exist_ok=True)
        save_onnx(vision_prefix_model(model), prefix)
        save_onnx(fsr_op_model(model), op)
    return OnnxRuntimeRunner("vision_prefix", prefix).activate(), OnnxRuntimeRunner("fsr_op", op).activate()


def open_model(loaded, manifest: dict, *, device: str | None = None, fsr_implementation: str = "fixed",
               with_parts: bool = True) -> Target:
    """A torch target over a model in memory (``manifest`` from ``model_manifest``)."""
    from fsr.runtime.torch_backend import TorchBackend

    torch_backend = TorchBackend.from_model(loaded, manifest, device=device, fsr_implementation=fsr_implementation)
    pipe = _bench_pipeline(manifest, loaded.processor, torch_backend, loaded.clip_tokenizer)
    return _torch_target(pipe, torch_backend, manifest, None, [], with_parts)


# ----------------------------------------------------------------------------- from export folders


def targets_from_exports(export_dirs: list[Path], backend: str, budgets: list[int] | None, workdir: Path, *,
                         device: str | None = None, fsr_implementation: str = "fixed",
                         backend_options: dict | None = None):
    """Specs (baseline first) and the model's info for export folders of one model."""
    from fsr.export.manifest import read_manifest

    found = []
    for d in export_dirs:
        manifest = read_manifest(Path(d))
        found.append((Path(d), manifest))
    keys = {_model_key(m) for _, m in found}
    if len(keys) > 1:
        raise BenchError("the export folders hold different models (source, dtype or LLM dims differ); "
                         "speedups are only meaningful between exports of one model: pass one model's exports")
    n_image = found[0][1]["num_image_tokens"]
    by_budget: dict[int, tuple[Path, dict]] = {}
    for d, m in found:
        key = n_image if m["method"] == "none" or _kept(m) >= n_image else _kept(m)
        if key in by_budget and by_budget[key][1]["method"] == "none" and m["method"] != "none":
            continue  # an identity FSR export and the unpruned one: keep the unpruned one
        by_budget[key] = (d, m)
    if n_image not in by_budget:
        raise BenchError("no unpruned export among the folders: speedups are measured against the unpruned export "
                         "of the same model; make one with `fsr-export llava --method none --model ...` and pass it too")
    wanted = sorted(by_budget, reverse=True) if budgets is None else _normalise_budgets(budgets, n_image)
    missing = [b for b in wanted if b not in by_budget]
    if missing:
        raise BenchError(f"no export for budget(s) {missing} among the folders "
                         f"(they hold {sorted(by_budget, reverse=True)})")
    d0, m0 = by_budget[n_image]
    info = ModelInfo.from_config(_export_config(d0, m0), source=(m0.get("model") or {}).get("source") or str(d0),
                                 dtype=m0["dtype"])
    specs = []
    for b in wanted:
        d, m = by_budget[b]
        method = "none" if b == n_image else m["method"]
        specs.append(TargetSpec(method, None if method == "none" else m["budget"], b, d,
                                _opener(open_export, d, backend, workdir, device=device,
                                        fsr_implementation=fsr_implementation, backend_options=backend_options),
                                {"path": str(d), "given": True}))
    return specs, info


def _normalise_budgets(budgets: list[int], n_image: int) -> list[int]:
    """Budgets >= N mean unpruned (N); the baseline is always measured, first."""
    if any(b < 1 for b in budgets):
        raise BenchError(f"budgets must be >= 1 (got {budgets})")
    out = [n_image] + sorted({min(b, n_image) for b in budgets} - {n_image}, reverse=True)
    return out


def _opener(fn, *args, **kwargs) -> Callable[..., Target]:
    return lambda with_parts=True: fn(*args, with_parts=with_parts, **kwargs)


# ----------------------------------------------------------------------------- from a preset


def preset_image_tokens(preset: str) -> int:
    from fsr.models.llava import PRESETS, ModelError

    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return (p.image_size // p.patch_size) ** 2


def export_folder(cache_dir: Path, preset: str, dtype: str, seed: int, budget: int | None) -> Path:
    tag = "none" if budget is None else f"fsr-b{budget}"
    return Path(cache_dir) / f"{preset}-{dtype}-seed{seed}" / tag


def _cached(folder: Path, preset: str, dtype: str, budget: int | None) -> bool:
    from fsr.export.manifest import ManifestError, read_manifest

    try:
        m = read_manifest(folder)
    except ManifestError:
        return False
    method = "none" if budget is None else "fsr"
    return ((m.get("model") or {}).get("preset") == preset and m["dtype"] == dtype and m["method"] == method
            and (budget is None or m["budget"] == budget))


def check_export_memory(preset: str, dtype: str, factor: float = 3.0) -> None:
    """Refuse an export this machine's memory cannot hold (weights, the exporter's copy, serialisation)."""
    import os

    from fsr.bench.analytic import DTYPE_BYTES
    from fsr.runtime.torch_backend import build_model

    loaded = build_model(preset, device="meta", dtype=dtype)  # sizes only, no weights
    params = sum(p.numel() for p in loaded.llava.parameters()) + sum(p.numel() for p in loaded.clip.parameters())
    need = factor * params * DTYPE_BYTES[dtype]
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise BenchError(
            f"exporting the {preset} preset in {dtype} needs about {need / 2**30:.0f} GiB of memory "
            f"({params / 1e9:.1f}B parameters); this machine has {have / 2**30:.0f} GiB. Benchmark it with "
            "--backend torch on a GPU (built on the device, no export), or export it on a larger machine "
            "(fsr-export llava --model ... --dtype fp16) and pass the folders")


def ensure_preset_exports(preset: str, budgets: list[int], cache_dir: Path, *, dtype: str = "fp32", seed: int = 0,
                          force: bool = False, progress: Callable[[str], None] = lambda s: None,
                          exporter=None, loader=None) -> list[dict]:
    """Export the unpruned model and one FSR export per budget < N into ``cache_dir`` (reused when there).

    Returns one record per budget (baseline first): ``{budget, method, path, reused, seconds}``.
    ``exporter(loaded, output, settings, force=...)`` and ``loader(preset, dtype, seed)`` default to
    ``export_llava`` and `fsr.runtime.torch_backend.build_model`.
    """
    from fsr.export.llava import ExportSettings, export_llava

    if exporter is None:
        check_export_memory(preset, dtype)
    exporter = exporter or export_llava
    if loader is None:
        from fsr.runtime.torch_backend import build_model

        loader = lambda name, dt, s: build_model(name, device="cpu", dtype=dt, seed=s)  # noqa: E731
    n_image = preset_image_tokens(preset)
    loaded = None
    records = []
    for b in _normalise_budgets(budgets, n_image):
        budget = None if b == n_image else b
        folder = export_folder(cache_dir, preset, dtype, seed, budget)
        record = {"budget": b, "method": "none" if budget is None else "fsr", "path": str(folder)}
        if not force and _cached(folder, preset, dtype, budget):
            records.append({**record, "reused": True, "seconds": 0.0})
            continue
        if loaded is None:
            progress(f"building the {preset} preset ({dtype}, seed {seed})")
            loaded = loader(preset, dtype, seed)
        progress(f"exporting {preset} {record['method']}" + (f" budget {budget}" if budget else "") + f" -> {folder}")
        settings = (ExportSettings(method="none", dtype=dtype) if budget is None
                    else ExportSettings(method="fsr", budget=budget, dtype=dtype))
        start = time.perf_counter()
        exporter(loaded, folder, settings, force=True)
        records.append({**record, "reused": False, "seconds": time.perf_counter() - start})
    return records


def targets_from_preset(preset: str, budgets: list[int], backend: str, workdir: Path, *, cache_dir: Path,
                        dtype: str | None = None, device: str | None = None, seed: int = 0, force: bool = False,
                        fsr_implementation: str = "fixed", progress: Callable[[str], None] = lambda s: None,
                        backend_options: dict | None = None):
    """Specs (baseline first), the model's info, and the export records for a preset."""
    if backend != "torch":
        dtype = dtype or "fp32"
        records = ensure_preset_exports(preset, budgets, cache_dir, dtype=dtype, seed=seed, force=force,
                                        progress=progress)
        specs, info = targets_from_exports([Path(r["path"]) for r in records], backend,
                                           [r["budget"] for r in records], workdir, device=device,
                                           fsr_implementation=fsr_implementation, backend_options=backend_options)
        for spec, record in zip(specs, records):
            spec.export = record
        return specs, info, records

    import torch

    from fsr.runtime.torch_backend import build_model, model_manifest

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    if preset == "llava-1.5-7b" and device == "cpu":
        raise BenchError("the llava-1.5-7b preset is sized for GPUs (about 15 GB of fp16 weights, 7B-parameter "
                         "prefill); this run would build it on the CPU. Run it where torch sees a CUDA device "
                         "(--device cuda), or use --preset small here")
    progress(f"building the {preset} preset on {device} ({dtype}, seed {seed})")
    start = time.perf_counter()
    loaded = build_model(preset, device=device, dtype=dtype, seed=seed)
    built = time.perf_counter() - start
    n_image = preset_image_tokens(preset)
    info = ModelInfo.from_config(loaded.llava.config, source=f"preset:{preset}", dtype=dtype)
    specs, records = [], []
    for b in _normalise_budgets(budgets, n_image):
        method = "none" if b == n_image else "fsr"
        manifest = model_manifest(loaded, method=method, budget=None if method == "none" else b, dtype=dtype)
        record = {"budget": b, "method": method, "path": None, "reused": False,
                  "seconds": built if not records else 0.0, "note": "model built in memory (torch backend)"}
        records.append(record)
        specs.append(TargetSpec(method, None if method == "none" else b, b, None,
                                _opener(open_model, loaded, manifest, device=device,
                                        fsr_implementation=fsr_implementation), record))
    return specs, info, records
