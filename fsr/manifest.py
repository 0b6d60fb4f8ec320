"""``manifest.json``: the contract between ``fsr-export`` and everything that reads an export.

One typed, versioned record (`Manifest`, nested dataclasses) read, verified and written
here and nowhere else::

    manifest = read_manifest(export_dir)                 # parsed, types and paths checked
    manifest.verify(export_dir, graphs=["vision"])       # hashes of what will be loaded
    manifest.graphs["vision"].file                       # the file the runtime loads ...
    manifest.graphs["vision"].files                      # ... is the first of the hashed files
    write_manifest(export_dir, manifest)                 # temp file + rename

Rules enforced when a manifest is read (each violation is a `ManifestError` naming the
field and the fix, never a traceback):

- the JSON is an object of the current ``format_version`` (an older one: "made by an older
  fsr-export; export again");
- every field has its declared type (``graphs.vision.files: expected a list``);
- every path (graph files, ``source/`` and its files, the CLIP folder, engines, the files
  engines and plugin graphs were made from) is relative and resolves inside the export
  folder, symbolic links included;
- a graph entry names at least one file, and the file a runtime loads is the first of its
  hashed ``files`` (one source of truth).

``source/`` (weights, processor, tokenizer, chat template) is hashed file by file too: the
chat template and the tokenizer change what a model generates.

This module is light (json, hashlib): the CLIs read manifests before any heavy import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from fsr.errors import FsrError
from fsr.files import atomic_write, locked

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
SOURCE_DIR = "source"
LAYOUT = "fsr"  # the file layout of an export's graphs: "fsr" (native) or "transformers.js" (fsr.export.transformers_js)
PACKAGES = ("fsr-export", "torch", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript")
#: Files of ``source/`` a runtime that does not run the PyTorch weights never reads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class ManifestError(FsrError, ValueError):
    """An export folder is missing, incomplete, altered or malformed; the message says what to do."""


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class FileRecord:
    """A file of the export (path relative to the export folder) and its SHA-256."""

    path: str
    sha256: str


@dataclasses.dataclass
class TensorInfo:
    """A graph input or output: name, NumPy dtype name, shape (ints, or names of dynamic dims)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclasses.dataclass
class GraphForm:
    """Another form of a graph, with the same inputs, outputs and weights (e.g. ``ort``: the decoder
    with ONNX Runtime's fused attention). ``files[0]`` is its model file; it shares the graph's
    external-data file, listed after it."""

    files: list[FileRecord]
    runtime: str = ""  # what can run it ("onnxruntime": it uses ONNX Runtime contrib ops)

    @property
    def file(self) -> str:
        return self.files[0].path


@dataclasses.dataclass
class GraphEntry:
    """One exported graph. ``files[0]`` is the model file a runtime loads; the others are
    its external data. Every one of them is hashed. ``optional_inputs`` have a default value
    in the graph (fed only to change it); ``forms`` are other forms of the graph."""

    files: list[FileRecord]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    optional_inputs: list[TensorInfo] = dataclasses.field(default_factory=list)
    forms: dict[str, GraphForm] = dataclasses.field(default_factory=dict)
    #: tensors the file names otherwise than our tools do: file name -> our name (a layout whose
    #: client reads a tensor by another name: Transformers.js's ``image_features`` is ``image_tokens``)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def file(self) -> str:
        return self.files[0].path

    def all_files(self) -> list[FileRecord]:
        """The graph's files and its forms', each path once."""
        seen: dict[str, FileRecord] = {f.path: f for f in self.files}
        for form in self.forms.values():
            for f in form.files:
                seen.setdefault(f.path, f)
        return list(seen.values())

    def our_names(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """A run's outputs (by the file's names) by the names our tools use."""
        return {self.aliases.get(k, k): v for k, v in outputs.items()} if self.aliases else outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def hashes(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}


@dataclasses.dataclass
class DecoderSegment:
    """LLM layers ``[layers[0], layers[1])`` in one graph. ``prune_before`` names a pruning
    graph that runs on the hidden states before this segment (a method that prunes inside the
    LLM); the method's runtime hook runs it and gives this segment its own KV length and
    position offset. ``image_tokens``: image tokens per image this segment sees (set when a
    method prunes inside the LLM; the pruning graph before it keeps that many of the previous
    segment's)."""

    graph: str
    layers: list[int]
    prune_before: str | None = None
    image_tokens: int | None = None


@dataclasses.dataclass
class LLMDims:
    """The language model's dimensions (written once, by the model spec)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None = None


@dataclasses.dataclass
class VisionDims:
    """The vision tower's dimensions, per crop (an image is one crop or several)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    layers_used: int  # encoder layers up to and including the one feeding the projector
    num_heads: int
    image_size: int
    patch_size: int
    tokens_per_crop: int  # patch tokens of one crop ([CLS] not counted)
    has_cls: bool
    projector_out: int  # = LLM hidden size


@dataclasses.dataclass
class ModelInfo:
    """Where the exported model came from."""

    source: str  # what the user asked for: "preset:tiny", a folder, a hub id
    path: str | None  # the resolved checkpoint folder (None: a preset built in memory)
    preset: str | None
    model_type: str  # config.json model_type
    random_weights: bool = False  # a preset: the text it generates is meaningless


@dataclasses.dataclass
class ImageInfo:
    image_token_id: int
    num_image_tokens: int  # image tokens the LLM sees per image without pruning (at most)
    #: ... with this export's pruning (at most; a method that prunes inside the LLM: the mean over the
    #: LLM's layers, rounded; each decoder segment's count is its ``image_tokens``)
    kept_image_tokens: int


@dataclasses.dataclass
class MethodInfo:
    """The pruning method (a name of `fsr.pruning.methods`) and its settings' JSON form;
    ``details``: what the method records about itself for readers (op, placement, what
    ``kept_indices`` hold, derived attributes); the runtime rebuilds everything from ``settings``."""

    name: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RelevanceInfo:
    """How the instruction embedding for a method's relevance term is computed (None: not used)."""

    source: str | None = None  # "clip" | "llm-embedding-mean" | None
    text_max_tokens: int | None = None  # CLIP text context (chunk length)
    clip_model: str | None = None  # folder of the CLIP model inside the export


@dataclasses.dataclass
class SourceInfo:
    """The source checkpoint saved in the export (a standard HF folder) and its hashed files."""

    folder: str = SOURCE_DIR
    files: list[FileRecord] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EngineSource:
    file: str  # the ONNX the engine was built from
    files: dict[str, str]  # every file it was built from -> sha256


@dataclasses.dataclass
class EngineEntry:
    """A TensorRT engine ``fsr-build`` made for one graph."""

    graph: str
    precision: str
    plugin: bool
    file: str
    size_bytes: int
    sha256: str
    source: EngineSource
    profiles: list[dict[str, Any]]
    tensorrt: dict[str, str]  # {"flavour": ..., "version": ...}
    built: str
    build_seconds: float
    low_precision_nodes: int = 0
    max_batch: int | None = None
    max_seq: int | None = None


@dataclasses.dataclass
class PluginGraphEntry:
    """A graph with its pruning function node turned into a TensorRT plugin node."""

    file: str
    files: dict[str, str]
    source_files: dict[str, str]
    plugin: dict[str, str]
    nodes: int


@dataclasses.dataclass
class Manifest:
    family: str  # model family (`fsr.models.registry`)
    model: ModelInfo
    method: MethodInfo
    dtype: str  # "fp32" | "fp16"
    llm: LLMDims
    vision: VisionDims
    image: ImageInfo
    relevance: RelevanceInfo
    decoder_segments: list[DecoderSegment]
    graphs: dict[str, GraphEntry]
    source: SourceInfo = dataclasses.field(default_factory=SourceInfo)
    format_version: int = FORMAT_VERSION
    layout: str = LAYOUT
    created: str = ""
    packages: dict[str, str] = dataclasses.field(default_factory=dict)
    engines: dict[str, EngineEntry] = dataclasses.field(default_factory=dict)
    plugin_graphs: dict[str, PluginGraphEntry] = dataclasses.field(default_factory=dict)

    # -- access -----------------------------------------------------------------------------

    def graph(self, name: str) -> GraphEntry:
        try:
            return self.graphs[name]
        except KeyError:
            raise ManifestError(f"the export has no {name!r} graph (it has {', '.join(self.graphs)})") from None

    @property
    def segment_graphs(self) -> list[str]:
        return [s.graph for s in self.decoder_segments]

    @property
    def pruning_graphs(self) -> list[str]:
        """The graphs that prune between decoder segments (``prune_before``), in order."""
        return [s.prune_before for s in self.decoder_segments if s.prune_before]

    # -- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where} holds a JSON {type(data).__name__}, not an object: not an fsr-export "
                                "manifest; export again")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
                raise ManifestError(f"{where} was made by an older fsr-export (manifest format {version}; this "
                                    f"version reads format {FORMAT_VERSION}); export again")
            if isinstance(version, int) and not isinstance(version, bool):
                raise ManifestError(f"{where} was made by a newer fsr-export (manifest format {version}; this "
                                    f"version reads format {FORMAT_VERSION}); upgrade fsr-export")
            raise ManifestError(f"{where} has no valid format_version: not an fsr-export manifest; export again")
        manifest = _from_json(cls, data, "")
        manifest._check_structure(where)
        return manifest

    def _check_structure(self, where: str) -> None:
        for name, entry in self.graphs.items():
            if not entry.files:
                raise ManifestError(f"{where}: graph {name!r} lists no files; export again")
            for key, form in entry.forms.items():
                if not form.files:
                    raise ManifestError(f"{where}: form {key!r} of graph {name!r} lists no files; export again")
        for s in self.decoder_segments:
            if s.graph not in self.graphs:
                raise ManifestError(f"{where}: decoder segment {s.graph!r} is not among the graphs; export again")
            if len(s.layers) != 2 or not 0 <= s.layers[0] < s.layers[1]:
                raise ManifestError(f"{where}: decoder segment {s.graph!r} has layers {s.layers}; export again")
            if s.prune_before is not None and s.prune_before not in self.graphs:
                raise ManifestError(f"{where}: decoder segment {s.graph!r} is pruned by {s.prune_before!r}, which is "
                                    "not among the graphs; export again")
        for rel in self.paths():
            check_relative(rel, where)

    def paths(self) -> Iterable[str]:
        """Every path the manifest names (all relative to the export folder)."""
        for entry in self.graphs.values():
            yield from (f.path for f in entry.all_files())
        yield self.source.folder
        yield from (f.path for f in self.source.files)
        if self.relevance.clip_model:
            yield self.relevance.clip_model
        for engine in self.engines.values():
            yield engine.file
            yield engine.source.file
            yield from engine.source.files
        for plugin in self.plugin_graphs.values():
            yield plugin.file
            yield from plugin.files
            yield from plugin.source_files

    # -- integrity --------------------------------------------------------------------------

    def resolve(self, root: Path, rel: str) -> Path:
        """``root / rel``, refused unless it stays inside the export folder."""
        return check_inside(Path(root), rel, f"{Path(root) / MANIFEST}")

    def verify(self, root: Path, graphs: Iterable[str] | None = None, source: str = "all") -> None:
        """Check the hashes of ``graphs`` (default: all) and of ``source/``.

        ``source``: ``"all"`` (every file), ``"processor"`` (every file but weights, for a
        runtime that does not run the PyTorch weights), ``"none"``.
        """
        root = Path(root)
        checked: set[str] = set()
        for name in self.graphs if graphs is None else graphs:
            for record in self.graph(name).all_files():
                if record.path not in checked:  # a file forms share is read once
                    _check_file(self.resolve(root, record.path), record.sha256, f"graph {name!r}", "export again")
                    checked.add(record.path)
        if source not in ("all", "processor", "none"):
            raise ValueError(f"source must be all, processor or none (got {source!r})")
        if source != "none":
            folder = self.resolve(root, self.source.folder)
            if not folder.is_dir():
                raise ManifestError(f"{folder} (the source model) is missing; export again")
            for record in self.source.files:
                if source == "processor" and record.path.endswith(WEIGHT_SUFFIXES):
                    continue
                _check_file(self.resolve(root, record.path), record.sha256, "source model", "export again")


def check_relative(rel: str, where: str) -> None:
    """Refuse a path that is empty, absolute or climbs out of the export folder (``..``)."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: an empty or non-text path {rel!r}; export again")
    if Path(rel).is_absolute() or rel.startswith("~"):
        raise ManifestError(f"{where}: path {rel!r} is absolute; an export only refers to files inside its own "
                            "folder; refused. Export again")
    if os.path.normpath(rel).split(os.sep)[0] == "..":
        raise ManifestError(f"{where}: path {rel!r} leads outside the export folder; refused. Export again")


def check_inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` if ``rel`` is a relative path that resolves inside ``root`` (symbolic links
    followed); else ManifestError."""
    check_relative(rel, where)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ManifestError(f"{where}: path {rel!r} leads outside the export folder ({target}); refused. "
                            "Export again")
    return Path(root) / rel


def _check_file(path: Path, digest: str, what: str, fix: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{what}: {path} is missing; {fix}")
    if sha256(path) != digest:
        raise ManifestError(f"{what}: {path} changed since export (hash mismatch); {fix}")


# ----------------------------------------------------------------------------- files


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(root: Path, path: Path) -> FileRecord:
    return FileRecord(Path(path).relative_to(root).as_posix(), sha256(path))


def hash_folder(root: Path, folder: str) -> list[FileRecord]:
    """Every file under ``root/folder``, sorted, with its hash."""
    base = Path(root) / folder
    return [file_record(root, p) for p in sorted(base.rglob("*")) if p.is_file()]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- read / write


def read_manifest(root: Path, *, verify: bool = False) -> Manifest:
    """The export's manifest, parsed and checked; with ``verify`` also every hash."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder; pass the folder that fsr-export wrote")
    if not path.is_file():
        raise ManifestError(f"{root} holds no {MANIFEST}: not an fsr-export folder (or an interrupted one); "
                            "export again with fsr-export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); export again") from exc
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    manifest = Manifest.from_json(data, str(path))
    for rel in manifest.paths():  # symbolic links inside the folder must not lead out of it
        check_inside(root, rel, str(path))
    if verify:
        manifest.verify(root)
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (`fsr.files.atomic_write`: temporary file in the
    folder, fsync, rename)."""
    return atomic_write(Path(root) / MANIFEST, json.dumps(manifest.to_json(), indent=2) + "\n")


def update_manifest(root: Path, change: Callable[[Manifest], None]) -> Manifest:
    """Re-read the manifest, apply ``change`` to it, write it back atomically; returns it.
    Holds a lock on the export folder meanwhile, so concurrent writers (two ``fsr-build``
    runs) lose no entry."""
    with locked(Path(root)):
        manifest = read_manifest(root)
        change(manifest)
        write_manifest(root, manifest)
    return manifest


# ----------------------------------------------------------------------------- JSON <-> dataclasses


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return str(tp)


def _bad(where: str, tp, value) -> ManifestError:
    shown = json.dumps(value)[:60] if not isinstance(value, (dict, list)) else type(value).__name__
    return ManifestError(f"{MANIFEST}: {where or 'the top level'}: expected {_describe(tp)}, got {shown}; the file "
                         "is damaged or was edited by hand: export again")


def _from_json(tp, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _from_json(option, value, where)
            except ManifestError:
                pass
        raise _bad(where, tp, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(where, tp, value)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                kwargs[f.name] = _from_json(hints[f.name], value[f.name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{MANIFEST}: {sub} is missing; the file is damaged or was edited by hand: "
                                    "export again")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(where, tp, value)
        (item,) = typing.get_args(tp)
        return [_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, tp, value)
        _, item = typing.get_args(tp)
        return {k: _from_json(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, tp, value)
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _bad(where, tp, value)
        return value
    raise TypeError(f"unsupported manifest field type {tp!r} at {where}")
