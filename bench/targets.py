"""What a benchmark runs: one *target* per budget (an export, or a model in memory) on one backend.

A `Target` bundles the pipeline that produces the first token (``Pipeline``'s steps on the
chosen backend) with two extra runners that time the vision graph's parts apart: ``tower``
(the vision graph up to the pruning op; the whole vision graph when nothing is pruned) and
``op`` (the pruning op alone).

Targets come from

- export folders (`targets_from_exports`): their manifests say method and budget; the
  baseline is the unpruned export of the same model; each export is verified as ``fsr-run``
  verifies it;
- a preset (`targets_from_preset`): the needed exports are made once into a cache folder
  (``ort`` / ``trt``) under a key of everything that decides an export's content
  (`export_cache_key`: the tool's version and code, the exporting packages' versions, the
  manifest format; then family, preset, dtype, seed, method and budget), or, on the
  ``torch`` backend, the model is built in memory on the device and each budget only
  swaps the method's settings (no export at all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from fsr.bench.analytic import DTYPE_BYTES
from fsr.bench.split import op_model, vision_prefix_model
from fsr.errors import FsrError
from fsr.export import ExportSettings, describe, export_model
from fsr.manifest import FORMAT_VERSION, LLMDims, Manifest, ManifestError, VisionDims, package_versions, read_manifest
from fsr.models import ModelError, get_family, get_spec, load_model
from fsr.models.spec import TORCH_DTYPES
from fsr.onnx_io import save_onnx
from fsr.pruning.methods import NoPruning, get_method, method_names
from fsr.runtime.onnxrt import OnnxRuntimeRunner
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.torch_backend import TorchBackend

BACKENDS = ("ort", "trt", "torch")
#: the pruning method of the exports a preset benchmark makes (``methods=`` / ``--methods`` for others)
PRESET_METHOD = "fsr"


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
    token_dim: int  # pruning op's token width = LLM hidden size (projector output)
    feature_dim: int  # pruning op's feature width = vision hidden size

    @classmethod
    def from_manifest(cls, manifest: Manifest, source: str) -> "ModelInfo":
        return cls(source, manifest.dtype, manifest.llm, manifest.vision, manifest.image.num_image_tokens,
                   manifest.llm.hidden_size, manifest.vision.hidden_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _model_key(manifest: Manifest) -> tuple:
    return (manifest.family, manifest.model.source, manifest.model.path, manifest.dtype,
            manifest.image.num_image_tokens, json.dumps(dataclasses.asdict(manifest.llm), sort_keys=True))


def is_unpruned(manifest: Manifest) -> bool:
    """True for an export that keeps every image token (a pruning export with budget >= N included)."""
    return manifest.image.kept_image_tokens >= manifest.image.num_image_tokens


def _budget(manifest: Manifest) -> int | None:
    """The export's budget: its method's (for a method pruning inside the LLM, the average the schedule
    was chosen for; with explicit stages, the mean image tokens per layer); None when unpruned."""
    method = get_method(manifest.method.name)
    if is_unpruned(manifest):
        return None
    budget = method.budget(method.settings_from_json(manifest.method.settings))
    return manifest.image.kept_image_tokens if budget is None else budget


def _segments(manifest: Manifest) -> list[dict]:
    return [dataclasses.asdict(s) for s in manifest.decoder_segments]


# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass
class Target:
    method: str
    budget: int | None  # None when unpruned
    kept_tokens: int
    num_image_tokens: int
    backend: str
    pipeline: Pipeline
    tower: object | None  # Runner: vision graph up to the op (None: not measurable on this backend)
    op: object | None  # Runner: the op alone (None when unpruned or not measurable)
    export_dir: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the manifest's decoder segments (graph, layers, prune_before, image_tokens)
    segments: list[dict] = dataclasses.field(default_factory=list)

    @property
    def unpruned(self) -> bool:
        return self.kept_tokens >= self.num_image_tokens

    @property
    def label(self) -> str:
        return "unpruned" if self.unpruned else f"{self.method}-b{self.budget}"

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
    num_image_tokens: int
    export_dir: Path | None
    open: Callable[..., Target]  # open(with_parts=True)
    export: dict | None = None  # how the export was obtained (path, reused, seconds)
    model: object | None = None  # the LoadedModel of a target built in memory (torch backend)

    @property
    def is_baseline(self) -> bool:
        return self.kept_tokens >= self.num_image_tokens


def _method_label(manifest: Manifest) -> str:
    """The method a result row names: the export's, or ``none`` when it keeps every token."""
    return NoPruning.name if is_unpruned(manifest) else manifest.method.name


def _target(pipe: Pipeline, manifest: Manifest, backend: str, tower, op, export_dir, notes) -> Target:
    return Target(_method_label(manifest), _budget(manifest), manifest.image.kept_image_tokens,
                  manifest.image.num_image_tokens, backend, pipe, tower, op, export_dir, notes, _segments(manifest))


def open_export(export_dir: Path, backend: str, workdir: Path, *, device: str | None = None,
                method_form: str = "fixed", with_parts: bool = True, backend_options: dict | None = None,
                verify: bool = True) -> Target:
    """A target over an export folder on ``backend`` (ort / trt / torch); ``with_parts``: the tower and
    op runners too. The export is verified first, as ``fsr-run`` verifies it."""
    export_dir = Path(export_dir)
    options = dict(backend_options or {})
    if backend == "torch":
        options.update(device=device, method_form=method_form)
    pipe = Pipeline(export_dir, backend=backend, verify=verify, **options)
    manifest = pipe.manifest
    method = get_method(manifest.method.name)
    notes: list[str] = []
    tower = op = None
    if not with_parts:
        pass
    elif is_unpruned(manifest) or method.prunes_in == "llm":
        tower = pipe.runners["vision"]  # a method that prunes inside the LLM: its graphs are timed per segment
    elif pipe.spec.prunes_on_host(method):  # the vision graph is the tower; the op runs in prune graphs, inside "vision"
        tower = pipe.runners["vision"]
        notes.append("pruning op: its prune graphs run per crop inside the vision step (not timed apart)")
    elif backend == "torch":
        tower = pipe.backend.runner("vision_tower").activate()
        op = pipe.backend.runner("pruning_op").activate()
        notes.append(f"pruning op: PyTorch {pipe.backend.method_form} form")
    elif backend == "ort" and method.onnx_op is not None:
        tower, op = _split_runners(export_dir, manifest, method.onnx_op, workdir)
    else:
        notes.append(f"vision tower and pruning op are not timed apart on the {backend} backend")
    return _target(pipe, manifest, backend, tower, op, export_dir, notes)


def _split_runners(export_dir: Path, manifest: Manifest, op: tuple[str, str], workdir: Path):
    """ONNX Runtime runners over the vision graph cut at the op's node (cached in ``workdir``)."""
    entry = manifest.graph("vision")
    vision = manifest.resolve(export_dir, entry.file)
    folder = Path(workdir) / f"split-{entry.files[0].sha256[:16]}"
    prefix, op_path = folder / "vision_tower.onnx", folder / "pruning_op.onnx"
    if not (prefix.is_file() and op_path.is_file()):
        model = onnx.load(vision)
        folder.mkdir(parents=True, exist_ok=True)
        save_onnx(vision_prefix_model(model, op), prefix)
        save_onnx(op_model(model, op), op_path)
    return OnnxRuntimeRunner("vision_tower", prefix).activate(), OnnxRuntimeRunner("pruning_op", op_path).activate()


def open_model(loaded, manifest: Manifest, *, device: str | None = None, method_form: str = "fixed",
               with_parts: bool = True) -> Target:
    """A torch target over a model in memory (``manifest`` from `fsr.export.describe`)."""
    backend = TorchBackend.from_model(loaded, manifest, device=device, method_form=method_form)
    pipe = Pipeline.from_backend(backend, loaded.processor, clip_tokenizer=loaded.clip_tokenizer)
    tower = op = None
    notes: list[str] = []
    if with_parts and (is_unpruned(manifest) or get_method(manifest.method.name).prunes_in == "llm"):
        tower = pipe.runners["vision"]
    elif with_parts:
        tower = backend.runner("vision_tower").activate()
        op = backend.runner("pruning_op").activate()
        notes.append(f"pruning op: PyTorch {backend.method_form} form")
    return _target(pipe, manifest, "torch", tower, op, None, notes)


# ----------------------------------------------------------------------------- from export folders


def targets_from_exports(export_dirs: list[Path], backend: str, budgets: list[int] | None, workdir: Path, *,
                         device: str | None = None, method_form: str = "fixed",
                         backend_options: dict | None = None):
    """Specs (baseline first) and the model's info for export folders of one model."""
    found = [(Path(d), read_manifest(Path(d))) for d in export_dirs]
    keys = {_model_key(m) for _, m in found}
    if len(keys) > 1:
        raise BenchError("the export folders hold different models (source, dtype or LLM dims differ); "
                         "speedups are only meaningful between exports of one model: pass one model's exports")
    n_image = found[0][1].image.num_image_tokens
    # one target per (method, budget): exports of several methods at one budget are measured side by side (the
    # budget of a method that prunes inside the LLM: the average its schedule was chosen for, `_budget`)
    by_key: dict[tuple[str, int], tuple[Path, Manifest]] = {}
    for d, m in found:
        method = get_method(m.method.name)
        if method.prunes and m.image.kept_image_tokens >= n_image and not method.is_identity(
                method.settings_from_json(m.method.settings), n_image):
            raise BenchError(f"{d} ({method.describe(method.settings_from_json(m.method.settings), n_image)}) hands "
                             f"the LLM {m.image.kept_image_tokens} image tokens, no fewer than the unpruned model's "
                             f"{n_image}: there is no speedup to measure; export it with a budget below {n_image}")
        key = (_method_label(m), n_image if is_unpruned(m) else min(_budget(m), n_image))
        if key in by_key and not get_method(by_key[key][1].method.name).prunes \
                and get_method(m.method.name).prunes:
            continue  # an identity pruning export and the unpruned one: keep the unpruned one
        if key in by_key and get_method(m.method.name).prunes:
            raise BenchError(f"two exports of method {key[0]} at budget {key[1]} ({by_key[key][0]}, {d}); pass one")
        by_key[key] = (d, m)
    baseline = (NoPruning.name, n_image)
    if baseline not in by_key:
        family = found[0][1].family
        raise BenchError("no unpruned export among the folders: speedups are measured against the unpruned export "
                         f"of the same model; make one with `fsr-export {family} --method none --model ...` and pass "
                         "it too")
    held = sorted({k for _, k in by_key}, reverse=True)
    wanted = held if budgets is None else _normalise_budgets(budgets, n_image)
    missing = [b for b in wanted if b not in held]
    if missing:
        raise BenchError(f"no export for budget(s) {missing} among the folders (they hold {held})")
    d0, m0 = by_key[baseline]
    info = ModelInfo.from_manifest(m0, m0.model.source or str(d0))
    keys = [baseline] + sorted((k for k in by_key if k != baseline and k[1] in wanted), key=lambda k: (-k[1], k[0]))
    specs = []
    for key in keys:
        d, m = by_key[key]
        specs.append(TargetSpec(_method_label(m), _budget(m), min(m.image.kept_image_tokens, n_image), n_image, d,
                                _opener(open_export, d, backend, workdir, device=device, method_form=method_form,
                                        backend_options=backend_options),
                                {"path": str(d), "given": True}))
    return specs, info


def _normalise_budgets(budgets: list[int], n_image: int) -> list[int]:
    """Budgets >= N mean unpruned (N); the baseline is always measured, first."""
    if any(b < 1 for b in budgets):
        raise BenchError(f"budgets must be >= 1 (got {budgets})")
    return [n_image] + sorted({min(b, n_image) for b in budgets} - {n_image}, reverse=True)


def _opener(fn, *args, **kwargs) -> Callable[..., Target]:
    return lambda with_parts=True: fn(*args, with_parts=with_parts, **kwargs)


# ----------------------------------------------------------------------------- from a preset


def preset_image_tokens(family: str, preset: str, seed: int = 0) -> int:
    """Image tokens per image of a preset (from its config; no weights are built)."""
    spec = get_spec(family)
    if preset not in spec.presets:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(spec.presets)}")
    loaded = spec.build_preset(preset, seed=seed, device="meta")
    return spec.num_image_tokens(loaded.config)


#: the packages of this tool whose code decides what an export holds
EXPORTING_CODE = ("fsr", "fsr.export", "fsr.graph_passes", "fsr.models", "fsr.pruning")


def export_cache_key() -> str:
    """``v<version>-<hash>``: the hash covers this tool's version and the source of its exporting
    packages (`EXPORTING_CODE`), the versions of the packages the manifest records (torch,
    transformers, onnx, ...) and the manifest format, so a cached export is reused only by
    the code that would write the same one."""
    versions = package_versions()
    h = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    for name, version in sorted(versions.items()):
        h.update(f"{name}=={version}\n".encode())
    for package in EXPORTING_CODE:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for file in sorted(Path(folder).glob("*.py")):
                h.update(f"{package}/{file.name}\n".encode())
                h.update(file.read_bytes())
    return f"v{versions.get('fsr-export', 'unknown')}-{h.hexdigest()[:12]}"


def cache_root(cache_dir: Path, key: str | None = None) -> Path:
    """The part of the cache this code uses (`export_cache_key`)."""
    return Path(cache_dir) / (key or export_cache_key())


def other_cache_keys(cache_dir: Path, key: str | None = None) -> list[Path]:
    """Cache folders written by other versions of the tool (never used by this one)."""
    key = key or export_cache_key()
    try:
        return sorted(p for p in Path(cache_dir).iterdir() if p.is_dir() and p.name.startswith("v") and p.name != key)
    except OSError:
        return []


def export_folder(cache_dir: Path, family: str, preset: str, dtype: str, seed: int, budget: int | None,
                  method: str = PRESET_METHOD, key: str | None = None) -> Path:
    tag = "none" if budget is None else f"{method}-b{budget}"
    return cache_root(cache_dir, key) / f"{family}-{preset}-{dtype}-seed{seed}" / tag


def _cached(folder: Path, preset: str, dtype: str, budget: int | None, method_name: str = PRESET_METHOD) -> bool:
    try:
        m = read_manifest(folder)
    except ManifestError:
        return False
    method = get_method(m.method.name)
    same_budget = budget is None if not method.prunes else \
        method.budget(method.settings_from_json(m.method.settings)) == budget
    return m.model.preset == preset and m.dtype == dtype and same_budget and \
        (method.name == method_name or budget is None)


def check_methods(methods) -> tuple[str, ...]:
    """The pruning methods a preset benchmark exports (each must have an in-graph form and prune)."""
    methods = tuple(dict.fromkeys(methods or (PRESET_METHOD,)))
    usable = method_names(exportable=True, prunes=True)
    wrong = [m for m in methods if m not in usable]
    if wrong:
        raise BenchError(f"cannot benchmark method(s) {wrong}: a preset benchmark exports pruning methods with an "
                         f"in-graph form ({', '.join(usable)}); the unpruned baseline is always measured")
    return methods


def _runs(budgets: list[int], n_image: int, methods: tuple[str, ...]) -> list[tuple[int, str | None]]:
    """(kept tokens, method) per target: the unpruned baseline (method None) first, then every method per budget."""
    normal = _normalise_budgets(budgets, n_image)
    return [(n_image, None)] + [(b, m) for b in normal[1:] for m in methods]


def check_export_memory(family: str, preset: str, dtype: str, factor: float = 3.0) -> None:
    """Refuse an export this machine's memory cannot hold (weights, the exporter's copy, serialisation)."""
    loaded = load_model(preset, family=family, device="meta", dtype=_torch_dtype(dtype))  # sizes only, no weights
    params = sum(p.numel() for p in loaded.model.parameters())
    params += sum(p.numel() for p in loaded.clip.parameters()) if loaded.clip is not None else 0
    need = factor * params * DTYPE_BYTES[dtype]
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise BenchError(
            f"exporting the {preset} preset in {dtype} needs about {need / 2**30:.0f} GiB of memory "
            f"({params / 1e9:.1f}B parameters); this machine has {have / 2**30:.0f} GiB. Benchmark it with "
            f"--backend torch on a GPU (built on the device, no export), or export it on a larger machine "
            f"(fsr-export {family} --model ... --dtype fp16) and pass the folders")


def _torch_dtype(dtype: str) -> torch.dtype:
    return TORCH_DTYPES[dtype]


def ensure_preset_exports(preset: str, budgets: list[int], cache_dir: Path, *, family: str = "llava",
                          dtype: str = "fp32", seed: int = 0, force: bool = False,
                          progress: Callable[[str], None] = lambda s: None, exporter=None, loader=None,
                          methods: tuple[str, ...] = (PRESET_METHOD,)) -> list[dict]:
    """Export the unpruned model and one pruned export per budget < N and method into ``cache_dir`` (reused
    when there).

    Returns one record per export (baseline first): ``{budget, method, path, reused, seconds}``.
    ``exporter(loaded, output, settings, force=...)`` and ``loader(preset, dtype, seed)`` default to
    `fsr.export.export_model` and `fsr.models.load_model`.
    """
    methods = check_methods(methods)
    if exporter is None:
        check_export_memory(family, preset, dtype)
    exporter = exporter or export_model
    if loader is None:
        def loader(name, dt, s):
            return load_model(name, family=family, dtype=_torch_dtype(dt), seed=s)
    n_image = preset_image_tokens(family, preset, seed)
    loaded = None
    records = []
    key = export_cache_key()
    for b, name in _runs(budgets, n_image, methods):
        budget = None if name is None else b
        folder = export_folder(cache_dir, family, preset, dtype, seed, budget, name or PRESET_METHOD, key)
        settings = (ExportSettings(NoPruning.name, dtype=dtype) if name is None
                    else ExportSettings(name, dtype=dtype, budget=budget))
        record = {"budget": b, "method": settings.method, "path": str(folder)}
        if not force and _cached(folder, preset, dtype, budget, settings.method):
            records.append({**record, "reused": True, "seconds": 0.0})
            continue
        if loaded is None:
            progress(f"building the {preset} preset ({dtype}, seed {seed})")
            loaded = loader(preset, dtype, seed)
        progress(f"exporting {preset} {record['method']}" + (f" budget {budget}" if budget else "") + f" -> {folder}")
        start = time.perf_counter()
        exporter(loaded, folder, settings, force=True)
        records.append({**record, "reused": False, "seconds": time.perf_counter() - start})
    return records


def targets_from_preset(preset: str, budgets: list[int], backend: str, workdir: Path, *, cache_dir: Path,
                        family: str = "llava", dtype: str | None = None, device: str | None = None, seed: int = 0,
                        force: bool = False, method_form: str = "fixed",
                        progress: Callable[[str], None] = lambda s: None, backend_options: dict | None = None,
                        methods: tuple[str, ...] = (PRESET_METHOD,)):
    """Specs (baseline first), the model's info, and the export records for a preset (every pruning method
    of ``methods`` at every budget)."""
    get_family(family)
    methods = check_methods(methods)
    if backend != "torch":
        dtype = dtype or "fp32"
        records = ensure_preset_exports(preset, budgets, cache_dir, family=family, dtype=dtype, seed=seed,
                                        force=force, progress=progress, methods=methods)
        specs, info = targets_from_exports([Path(r["path"]) for r in records], backend,
                                           sorted({r["budget"] for r in records}), workdir, device=device,
                                           method_form=method_form, backend_options=backend_options)
        by_path = {r["path"]: r for r in records}
        for spec in specs:
            spec.export = by_path[str(spec.export_dir)]
        return specs, info, records

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    n_params = _parameters(family, preset, dtype)
    if device == "cpu" and n_params > 3e9:
        raise BenchError(f"the {preset} preset is sized for GPUs ({n_params / 1e9:.1f}B parameters); this run would "
                         "build it on the CPU. Run it where torch sees a CUDA device (--device cuda), or use a "
                         "smaller preset here")
    progress(f"building the {preset} preset on {device} ({dtype}, seed {seed})")
    start = time.perf_counter()
    loaded = load_model(preset, family=family, device=device, dtype=_torch_dtype(dtype), seed=seed)
    built = time.perf_counter() - start
    n_image = get_spec(family).num_image_tokens(loaded.config)
    info = None
    specs, records = [], []
    for b, name in _runs(budgets, n_image, methods):
        settings = (ExportSettings(NoPruning.name, dtype=dtype) if name is None
                    else ExportSettings(name, dtype=dtype, budget=b))
        manifest = describe(loaded, settings)
        info = info or ModelInfo.from_manifest(manifest, f"preset:{preset}")
        record = {"budget": b, "method": settings.method, "path": None, "reused": False,
                  "seconds": built if not records else 0.0, "note": "model built in memory (torch backend)"}
        records.append(record)
        specs.append(TargetSpec(settings.method, settings.budget, manifest.image.kept_image_tokens, n_image, None,
                                _opener(open_model, loaded, manifest, device=device, method_form=method_form),
                                record, model=loaded))
    return specs, info, records


def transformers_reference(specs: list[TargetSpec], device: str | None = None):
    """Plain transformers ``generate`` on the baseline's weights: the model in memory, or the unpruned
    export's ``source/`` checkpoint (`fsr.bench.transformers_ref`)."""
    from fsr.bench.transformers_ref import TransformersGenerate  # noqa: PLC0415

    base = specs[0]
    device = device or "cpu"
    if base.model is not None:
        return TransformersGenerate(base.model, base.model.family, device)
    if base.export_dir is None:
        raise BenchError("the baseline has neither an export folder nor a model in memory")
    return TransformersGenerate.from_export(base.export_dir, device)


def _parameters(family: str, preset: str, dtype: str) -> int:
    loaded = load_model(preset, family=family, device="meta", dtype=_torch_dtype(dtype))
    return sum(p.numel() for p in loaded.model.parameters())
