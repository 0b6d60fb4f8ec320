"""Build one TensorRT engine per exported graph (``fsr-build``).

    report = build_engines("exports/llava-tiny-fsr-b64", BuildSettings(precision="fp16"))

Per graph: optimization profiles from the manifest (`fsr.engines.profiles`), the graph
rewritten for the precision when needed (`fsr.engines.precision`), a strongly typed
build with whichever TensorRT is installed, the engine written to
``engines/<graph>.<precision>.engine`` (``<graph>.plugin.<precision>`` for the plugin
vision graph), and recorded in the manifest with the hashes of its ONNX. Full TensorRT
reuses and updates ``engines/timing.cache``. The run's report is merged into
``engines/build_report.json`` (one row per engine, the latest build of each).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import time
from pathlib import Path

from fsr.engines.loader import EngineBuildError, EngineBytesFromOnnx
from fsr.engines.plugin_graph import (
    PluginError, find_plugin_library, plugin_unsupported_message, write_plugin_graph,
)
from fsr.engines.profiles import graph_profiles, check_limits
from fsr.engines.records import ENGINES_DIR, PRECISIONS, engine_id, engine_path, hash_files, write_atomic
from fsr.engines.trt_import import TensorRT, import_tensorrt
from fsr.files import clean_stale, safe_writes
from fsr.manifest import (
    EngineEntry, EngineSource, Manifest, ManifestError, read_manifest, sha256, update_manifest,
)
from fsr.pruning.methods import get_method
from fsr.settings import SettingsError

REPORT = "build_report.json"
TIMING_CACHE = "timing.cache"


@dataclasses.dataclass
class BuildSettings:
    precision: str = "fp32"
    max_batch: int = 4
    max_seq: int = 2048
    plugin: bool = False
    plugin_library: Path | None = None
    timing_cache: Path | None = None  # default: EXPORT/engines/timing.cache
    graphs: tuple[str, ...] = ()  # default: every graph of the export
    verbose: bool = False

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise SettingsError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        check_limits(self.max_batch, self.max_seq)


@dataclasses.dataclass
class EngineReport:
    engine: str
    graph: str
    precision: str
    plugin: bool
    file: str
    size_bytes: int
    build_seconds: float
    profiles: list[dict]
    flavour: str
    version: str
    low_precision_nodes: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BuildReport:
    export_dir: Path
    flavour: str
    version: str
    settings: BuildSettings
    engines: list[EngineReport]
    timing_cache: str
    plugin_graph: str | None
    warnings: list[str]
    total_seconds: float
    report_file: Path | None = None


class Progress:
    """What `build_engines` tells its caller; the CLI draws it with rich. Default: silent."""

    def begin(self, total: int) -> None: ...

    def engine_started(self, name: str) -> None: ...

    def step(self, text: str) -> None: ...

    def engine_done(self, report: EngineReport) -> None: ...


@safe_writes("TensorRT engines", interrupted="the engines already built are complete and recorded in "
                                            "manifest.json; nothing half-written was left")
def build_engines(export_dir: Path, settings: BuildSettings | None = None, *,
                  progress: Progress | None = None, trt: TensorRT | None = None) -> BuildReport:
    settings = settings or BuildSettings()
    settings.validate()
    progress = progress or Progress()
    export_dir = Path(export_dir)
    started = time.perf_counter()
    manifest = read_manifest(export_dir, verify=True)
    trt = trt or import_tensorrt()
    graphs = list(settings.graphs or manifest.graphs)
    unknown = [g for g in graphs if g not in manifest.graphs]
    if unknown:
        raise ManifestError(f"the export has no graph(s) {unknown} (it has {', '.join(manifest.graphs)})")
    warnings = _limit_warnings(manifest, settings)
    method = get_method(manifest.method.name)
    for folder in (export_dir, export_dir / ENGINES_DIR):  # temporaries of a killed fsr-build
        warnings += clean_stale(folder).notes()

    libraries: tuple[Path, ...] = ()
    if settings.plugin:
        if not trt.has_plugin_support:
            raise PluginError(plugin_unsupported_message(trt))
        if not method.tensorrt_plugin:
            raise PluginError(f"--plugin needs an export whose pruning op has a TensorRT plugin (this one has "
                              f"method {method.name!r}); build without --plugin")
        libraries = (find_plugin_library(settings.plugin_library),)
    plugin_graph = write_plugin_graph(export_dir, manifest) if method.tensorrt_plugin else None
    if settings.plugin and plugin_graph is None:
        raise PluginError("the export's vision graph holds no FocusScanRefine node; build without --plugin")

    engines_dir = export_dir / ENGINES_DIR
    engines_dir.mkdir(exist_ok=True)
    cache = settings.timing_cache or engines_dir / TIMING_CACHE
    if trt.has_timing_cache:
        cache_note = str(cache)
    else:
        cache_note = f"not used: timing-cache calls are no-ops in {trt.label}"

    progress.begin(len(graphs))
    reports = []
    for graph in graphs:
        use_plugin = settings.plugin and graph == "vision"
        source_rel = plugin_graph.file if use_plugin else manifest.graphs[graph].file
        source_files = dict(plugin_graph.files, **plugin_graph.source_files) if use_plugin \
            else manifest.graphs[graph].hashes()
        name = engine_id(graph, settings.precision, use_plugin)
        progress.engine_started(name)
        profiles = graph_profiles(manifest, graph, settings.max_batch, settings.max_seq)
        build = EngineBytesFromOnnx(
            manifest.resolve(export_dir, source_rel), profiles, settings.precision, trt=trt,
            timing_cache=cache if trt.has_timing_cache else None,
            plugin_libraries=libraries if use_plugin else (), progress=progress.step, work_dir=engines_dir,
            verbose=settings.verbose)
        start = time.perf_counter()
        try:
            data = build()
        except EngineBuildError as exc:
            raise EngineBuildError(f"graph {graph!r} ({settings.precision}): {exc}") from exc
        seconds = time.perf_counter() - start
        path = engine_path(export_dir, graph, settings.precision, use_plugin)
        rel = path.relative_to(export_dir).as_posix()
        entry = EngineEntry(
            graph=graph, precision=settings.precision, plugin=use_plugin, file=rel, size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), source=EngineSource(source_rel, source_files),
            profiles=[p.to_json() for p in profiles],
            tensorrt={"flavour": trt.flavour, "version": trt.version},
            built=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(seconds, 3), low_precision_nodes=build.stats.low_precision_nodes,
            max_batch=settings.max_batch, max_seq=settings.max_seq)
        if hash_files(export_dir, source_files) != source_files:
            raise ManifestError(f"{source_rel} changed while its engine was being built; run fsr-build again")
        # the manifest records the engine before the engine file takes its name: no engine outside the manifest
        write_atomic(path, data, before_replace=lambda: update_manifest(
            export_dir, lambda m: m.engines.__setitem__(name, entry)))
        report = EngineReport(name, graph, settings.precision, use_plugin, rel, len(data), round(seconds, 3),
                              entry.profiles, trt.flavour, trt.version, build.stats.low_precision_nodes)
        reports.append(report)
        progress.engine_done(report)

    result = BuildReport(export_dir, trt.flavour, trt.version, settings, reports, cache_note,
                         plugin_graph.file if plugin_graph else None, warnings,
                         round(time.perf_counter() - started, 3))
    result.report_file = _write_report(engines_dir / REPORT, result)
    return result


def _limit_warnings(manifest: Manifest, settings: BuildSettings) -> list[str]:
    image_tokens = manifest.image.kept_image_tokens
    if manifest.decoder_segments and settings.max_seq <= image_tokens:
        return [f"--max-seq {settings.max_seq} leaves no room for a prompt: the export gives the LLM "
                f"{image_tokens} image tokens; these engines cannot run a generation (use --max-seq > "
                f"{image_tokens})"]
    return []


def _write_report(path: Path, result: BuildReport) -> Path:
    """Merge this run into ``build_report.json``: the latest build of each engine, plus the run."""
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        old = {}
    engines = old.get("engines", {}) if isinstance(old.get("engines"), dict) else {}
    engines.update({r.engine: r.to_json() for r in result.engines})
    s = result.settings
    report = {
        "engines": dict(sorted(engines.items())),
        "last_run": {
            "tensorrt": {"flavour": result.flavour, "version": result.version},
            "precision": s.precision, "max_batch": s.max_batch, "max_seq": s.max_seq, "plugin": s.plugin,
            "engines": [r.engine for r in result.engines],
            "timing_cache": result.timing_cache,
            "plugin_graph": result.plugin_graph,
            "warnings": result.warnings,
            "total_seconds": result.total_seconds,
        },
    }
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    return path
