"""Engines and plugin graphs in ``manifest.json``, and the check that an engine is still fresh.

``fsr-build`` adds two sections to an export's manifest::

    "engines": {
      "vision.fp16": {
        "graph": "vision", "precision": "fp16", "plugin": false,
        "file": "engines/vision.fp16.engine", "size_bytes": ..., "sha256": ...,
        "source": {"file": "vision.onnx", "files": {"vision.onnx": "<sha256>"}},
        "profiles": [{"name": "default", "shapes": {"pixel_values": {"min": [...], "opt": [...], "max": [...]}}}],
        "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"},
        "built": "2026-...", "build_seconds": 3.1, "low_precision_nodes": 117
      }, ...
    },
    "plugin_graphs": {
      "vision": {"file": "vision.plugin.onnx", "files": {"vision.plugin.onnx": "<sha256>"},
                 "source_files": {"vision.onnx": "<sha256>"},
                 "plugin": {"name": "FocusScanRefine", "version": "1", "namespace": "fsr"}, "nodes": 1}
    }

``source.files`` holds the hash of every file the engine was built from (a plugin
engine: the plugin graph and the graph it was made from). `check_engine_fresh`
recomputes them and the engine's own hash, so a runtime refuses an engine that changed or
whose ONNX changed since the build, without needing a GPU. The records are typed
(`fsr.manifest.EngineEntry`, `fsr.manifest.PluginGraphEntry`); the manifest is always
rewritten atomically (`fsr.manifest.update_manifest`).
"""

from __future__ import annotations

from pathlib import Path

from fsr.files import atomic_write
from fsr.manifest import EngineEntry, Manifest, ManifestError, sha256, update_manifest  # noqa: F401 (re-exported)

ENGINES_DIR = "engines"
PRECISIONS = ("fp32", "fp16", "bf16")


class StaleEngineError(ManifestError):
    """An engine no longer matches the ONNX it was built from (or is missing); rebuild it."""


def engine_id(graph: str, precision: str, plugin: bool = False) -> str:
    return f"{graph}.plugin.{precision}" if plugin else f"{graph}.{precision}"


def engine_path(export_dir: Path, graph: str, precision: str, plugin: bool = False) -> Path:
    return Path(export_dir) / ENGINES_DIR / f"{engine_id(graph, precision, plugin)}.engine"


write_atomic = atomic_write  # temporary beside the file, fsync, rename (fsr.files)


def hash_files(export_dir: Path, rels) -> dict[str, str]:
    return {rel: sha256(Path(export_dir) / rel) for rel in rels}


def select_engine(manifest: Manifest, graph: str, precision: str | None = None,
                  plugin: bool | None = None) -> tuple[str, EngineEntry]:
    """The engine to run for ``graph``: filtered by ``precision`` and ``plugin`` when given;
    among several, the plugin engine first, then the most recently built."""
    engines = manifest.engines
    matches = [(eid, e) for eid, e in engines.items() if e.graph == graph
               and (precision is None or e.precision == precision)
               and (plugin is None or e.plugin == plugin)]
    if not matches:
        wanted = " ".join(filter(None, [precision, "plugin" if plugin else None]))
        have = ", ".join(sorted(engines)) or "none"
        raise ManifestError(f"the export has no {wanted + ' ' if wanted else ''}TensorRT engine for graph {graph!r} "
                            f"(engines: {have}); run fsr-build first")
    matches.sort(key=lambda m: (m[1].plugin, m[1].built), reverse=True)
    return matches[0]


def check_engine_fresh(manifest: Manifest, export_dir: Path, graph: str, precision: str | None = None,
                       plugin: bool | None = None) -> EngineEntry:
    """Select the engine of ``graph`` and make sure it and its ONNX are as built; returns its entry.

    Raises `StaleEngineError` when the engine file is missing or changed, or any source
    file changed (or is gone) since the build. Needs no GPU and no TensorRT.
    """
    export_dir = Path(export_dir)
    eid, entry = select_engine(manifest, graph, precision, plugin)
    engine = manifest.resolve(export_dir, entry.file)
    if not engine.is_file():
        raise StaleEngineError(f"engine {entry.file} ({eid}) is missing; run fsr-build again")
    for rel, digest in entry.source.files.items():
        source = manifest.resolve(export_dir, rel)
        if not source.is_file():
            raise StaleEngineError(f"{rel}, the ONNX engine {entry.file} was built from, is missing; "
                                   "export again and run fsr-build again")
        if sha256(source) != digest:
            raise StaleEngineError(f"engine {entry.file} refused: {rel} changed since the engine was built; "
                                   "run fsr-build again")
    if sha256(engine) != entry.sha256:
        raise StaleEngineError(f"engine {entry.file} refused: the file changed since fsr-build wrote it (hash "
                               "mismatch); run fsr-build again")
    return entry
