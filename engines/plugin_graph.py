"""The plugin graph (``vision.plugin.onnx``) and the plugin library it needs at build time.

`write_plugin_graph` runs `fsr.graph_passes.fsr_to_plugin.fsr_function_to_plugin` over
the vision graph and records the result under ``manifest["plugin_graphs"]`` with the
hash of the graph it was made from; it is rewritten only when that graph changed.
`find_plugin_library` locates ``libfsr_plugin.so`` (built from ``plugin/`` with CMake).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from fsr.errors import FsrError
from fsr.engines.records import hash_files, update_manifest, write_atomic
from fsr.manifest import Manifest, PluginGraphEntry

PLUGIN_GRAPH_SUFFIX = ".plugin.onnx"
PLUGIN_LIBRARY_ENV = "FSR_PLUGIN_LIBRARY"
PLUGIN_LIBRARY_NAME = "libfsr_plugin.so"
_REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIBRARY_PLACES = (_REPO / "build" / "plugin", _REPO / "plugin" / "build")
BUILD_HINT = ("build it with: cmake -S plugin -B build/plugin -DTensorRT_ROOT=<TensorRT folder> && "
              "cmake --build build/plugin -j")


class PluginError(FsrError, RuntimeError):
    """The plugin path cannot be used here; the message says why and what to do."""


def has_fsr_node(model: onnx.ModelProto) -> bool:
    from fsr.graph_passes.fsr_to_plugin import FSR_DOMAIN, FSR_OP

    return any(n.op_type == FSR_OP and n.domain == FSR_DOMAIN for n in model.graph.node)


def make_plugin_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its FocusScanRefine function node turned into a plugin node (checked)."""
    from fsr.graph_passes.fsr_to_plugin import check_plugin_model, fsr_function_to_plugin

    out = gs.export_onnx(fsr_function_to_plugin(gs.import_onnx(model)), do_type_check=True)
    out.ir_version = model.ir_version
    check_plugin_model(out)
    return out


def write_plugin_graph(export_dir: Path, manifest: Manifest, graph: str = "vision") -> PluginGraphEntry | None:
    """Write ``<graph>.plugin.onnx`` (if ``graph`` holds FSR) and record it; returns its entry.

    Returns None for a graph without FocusScanRefine (``--method none``).
    """
    from fsr.graph_passes.fsr_to_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, count_plugin_nodes

    export_dir = Path(export_dir)
    entry = manifest.graphs.get(graph)
    if entry is None:
        return None
    source_files = hash_files(export_dir, entry.hashes())
    rel = Path(entry.file).with_suffix("").as_posix() + PLUGIN_GRAPH_SUFFIX
    old = manifest.plugin_graphs.get(graph)
    if old and old.source_files == source_files and (export_dir / rel).is_file() \
            and hash_files(export_dir, old.files) == old.files:
        return old
    model = onnx.load(export_dir / entry.file)
    if not has_fsr_node(model):
        return None
    plugin_model = make_plugin_model(model)
    if plugin_model.ByteSize() >= 2**31 - 1:
        raise PluginError(f"the {graph} graph is over 2 GB; the plugin graph writer keeps it in one file")
    write_atomic(export_dir / rel, plugin_model.SerializeToString())
    record = PluginGraphEntry(
        file=rel, files=hash_files(export_dir, [rel]), source_files=source_files,
        plugin={"name": PLUGIN_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE},
        nodes=count_plugin_nodes(plugin_model))

    def change(m: Manifest) -> None:
        m.plugin_graphs[graph] = record

    manifest.__dict__.update(update_manifest(export_dir, change).__dict__)
    return record


def find_plugin_library(path: Path | str | None = None) -> Path:
    """``path``, else ``$FSR_PLUGIN_LIBRARY``, else ``build/plugin/`` or ``plugin/build/`` of this checkout."""
    candidates = [Path(path)] if path else []
    if not candidates and os.environ.get(PLUGIN_LIBRARY_ENV):
        candidates = [Path(os.environ[PLUGIN_LIBRARY_ENV])]
    if not candidates:
        candidates = [d / PLUGIN_LIBRARY_NAME for d in DEFAULT_LIBRARY_PLACES]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise PluginError(f"{PLUGIN_LIBRARY_NAME} not found (looked at {', '.join(map(str, candidates))}); "
                      f"pass --plugin-library or set {PLUGIN_LIBRARY_ENV}, or {BUILD_HINT}")


def load_plugin_library(trt, library: Path) -> None:
    """Load ``libfsr_plugin.so`` so its creator is in TensorRT's plugin registry (full TensorRT only)."""
    if not trt.has_plugin_support:
        raise PluginError(plugin_unsupported_message(trt))
    import ctypes

    from fsr.graph_passes.fsr_to_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

    # The library registers its creator when it is loaded (static registration), as
    # `polygraphy run --plugins` and `trtexec --staticPlugins` expect.
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise PluginError(f"cannot load {library}: {exc}") from exc
    registry = trt.module.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise PluginError(f"{library} loaded, but TensorRT's registry has no plugin {PLUGIN_NAMESPACE}::"
                          f"{PLUGIN_NAME} version {PLUGIN_VERSION}; was it built with "
                          "FSR_PLUGIN_STATIC_REGISTRATION=ON?")


def plugin_unsupported_message(trt) -> str:
    return (f"--plugin needs full TensorRT: {PLUGIN_LIBRARY_NAME} is built against TensorRT's libnvinfer, and "
            f"{trt.label} (installed here) cannot load it. Install TensorRT (pip install tensorrt) on a machine "
            "with the plugin built, or build without --plugin: the engine then runs FocusScanRefine from its "
            "ONNX function body")
