"""Export a model of any registered family to ONNX graphs with its pruning method inside.

::

    loaded = load_model("tiny")                                   # fsr.models
    export_model(loaded, "exports/tiny-b64", ExportSettings("fsr", budget=64))

The family's spec (`fsr.models.spec.ModelSpec`) says which graphs exist and which module
is traced for each; the method (`fsr.pruning.methods`) says which vision-tower outputs it
reads and puts its op into the vision graph. The export folder::

    manifest.json        what is here, how it was made, hashes (fsr.manifest.Manifest)
    source/              the source model as a standard HF checkpoint (+ processor, + clip/)
    vision.onnx          pixels (+ instruction embedding) -> image_tokens [B,K,H] (+ kept_indices)
                         (multi-crop families: the tower's outputs per crop; the op is in prune_b*.onnx)
    prune_b<K>.onnx      multi-crop families only: the method's op alone, budget K per row, any N
    embed.onnx           token ids -> LLM input embeddings
    decoder.onnx         prefill and decode (or decoder_0.onnx, ... per segment)
    text_encoder.onnx    CLIP text tower (only when relevance comes from CLIP)

``ExportSettings(format="transformers.js")`` writes the graphs as ``onnx/vision_encoder.onnx``,
``onnx/embed_tokens.onnx``, ``onnx/decoder_model_merged.onnx`` with the files Transformers.js
reads beside them (`fsr.export.transformers_js`); the manifest points at them.

Everything is written into a temporary folder beside the target and moved into place
at the end, so a failure or an interrupt never leaves a half-written export behind.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx.compose
import onnx_graphsurgeon as gs
import torch

from fsr.errors import FsrError
from fsr.export import transformers_js
from fsr.export.share import SHARED_INDEX, referenced_files, share_weights
from fsr.export.trace import save_forms, trace, trace_to_onnx
from fsr.files import OutputFolder
from fsr.graph_passes import finalize
from fsr.manifest import (
    SOURCE_DIR, DecoderSegment, FileRecord, GraphEntry, GraphForm, ImageInfo, Manifest, MethodInfo, ModelInfo,
    SourceInfo, TensorInfo, file_record, hash_folder, package_versions, write_manifest,
)
from fsr.models import get_spec
from fsr.models.spec import CLIP_RELEVANCE, TORCH_DTYPES, GraphSpec, LoadedModel
from fsr.onnx_io import save_onnx
from fsr.pruning.methods import get_method, method_names
from fsr.settings import DTYPES, FORMATS, Settings

#: the vision graph's tensor between a method placed before the projector and the projector
PRUNED_FEATURES = "pruned_features"


class ExportConfigError(FsrError, ValueError):
    """Bad export settings; the message names the setting and the fix."""


class ExportSettings:
    """What an export is made with: the pruning method and its settings, the dtype, decoder splits.

    ``ExportSettings("fsr", budget=64)`` takes the method's options by keyword
    (`fsr.pruning.methods`); ``settings=`` takes a method settings object instead.
    ``decoder_splits``: LLM layer indices where the decoder is cut into segments.
    """

    def __init__(self, method: str = "fsr", *, dtype: str = "fp32", decoder_splits: tuple[int, ...] = (),
                 settings: Settings | None = None, format: str = "native", **options: Any):
        self.method = method
        self.dtype = dtype
        self.format = format
        self.decoder_splits = tuple(decoder_splits)
        pruning = get_method(method)
        self.method_settings = settings if settings is not None else pruning.settings(**options)
        self.validate()

    @property
    def budget(self) -> int | None:
        return get_method(self.method).budget(self.method_settings)

    def validate(self) -> None:
        method = get_method(self.method)
        if not method.exportable:
            raise ExportConfigError(f"method {self.method!r} has no in-graph form and cannot be exported; "
                                    f"exportable methods: {', '.join(method_names(exportable=True))}")
        if not isinstance(self.method_settings, method.Settings):
            raise ExportConfigError(f"method {self.method!r} takes {method.Settings.__name__}, "
                                    f"got {type(self.method_settings).__name__}")
        self.method_settings.validate()
        if self.dtype not in DTYPES:
            raise ExportConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.format not in FORMATS:
            raise ExportConfigError(f"unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}")
        splits = list(self.decoder_splits)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in splits) or splits != sorted(set(splits)):
            raise ExportConfigError(f"decoder_splits must be increasing layer indices >= 1 (got {splits})")

    def __repr__(self) -> str:
        return (f"ExportSettings(method={self.method!r}, settings={self.method_settings!r}, dtype={self.dtype!r}, "
                f"decoder_splits={self.decoder_splits!r}, format={self.format!r})")


def _noop(step: str) -> None:
    pass


# ----------------------------------------------------------------------------- the plan


def describe(loaded: LoadedModel, settings: ExportSettings) -> Manifest:
    """The manifest of an export of ``loaded`` with ``settings``, before any file is written
    (graph entries without files). The exporter fills in the files; the runtime's PyTorch back
    end runs a model in memory from it directly."""
    spec = get_spec(loaded.family)
    method = get_method(settings.method)
    config = loaded.config
    llm, vision = spec.llm_dims(config), spec.vision_dims(config)
    n_image = spec.num_image_tokens(config)
    entering = method.vision_tokens(settings.method_settings, n_image)
    try:
        stages = {st.layer: st for st in method.llm_stages(settings.method_settings, num_layers=llm.num_layers,
                                                           num_visual=entering)}
    except FsrError as exc:
        raise ExportConfigError(str(exc)) from exc
    if stages and spec.host_pruning:
        raise ExportConfigError(
            f"the {spec.name} family gives each image a variable number of tokens (crops gathered on the host); "
            f"method {method.name!r} prunes inside the LLM with a fixed token count per stage and cannot be "
            "exported for it; choose a method that prunes in the vision graph")
    splits = sorted({*settings.decoder_splits, *stages})
    bounds = [0, *splits, llm.num_layers]
    if bounds != sorted(set(bounds)):
        raise ExportConfigError(f"decoder_splits {list(settings.decoder_splits)} must lie inside the LLM's "
                                f"{llm.num_layers} layers")
    segments, tokens = [], entering
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        stage = stages.get(a)
        tokens = stage.keep if stage else tokens
        segments.append(DecoderSegment("decoder" if len(bounds) == 2 else f"decoder_{s}", [a, b],
                                       prune_before=stage.graph if stage else None,
                                       image_tokens=tokens if stages else None))
    relevance = spec.relevance_info(loaded, method.relevance_mode(settings.method_settings))
    names = ["vision", "embed"] + (["text_encoder"] if relevance.source == CLIP_RELEVANCE else [])
    for segment in segments:
        names += [segment.prune_before, segment.graph] if segment.prune_before else [segment.graph]
    manifest = Manifest(
        family=spec.name,
        model=ModelInfo(loaded.source, loaded.path, loaded.preset, config.model_type, loaded.random_weights),
        method=MethodInfo(method.name, settings.method_settings.to_json(),
                          {**method.manifest_details(settings.method_settings),
                           **spec.method_details(config, method, settings.method_settings)}),
        dtype=settings.dtype,
        llm=llm,
        vision=vision,
        image=ImageInfo(spec.image_token_id(config), n_image, spec.kept_image_tokens(config, method,
                                                                                      settings.method_settings,
                                                                                      llm.num_layers)),
        relevance=relevance,
        decoder_segments=segments,
        graphs={name: GraphEntry([], [], []) for name in names},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        packages=package_versions(),
        layout=transformers_js.LAYOUTS[settings.format],
    )
    prune = spec.prune_graph_names(config, manifest)  # the method's op on host-gathered rows (multi-crop families)
    manifest.graphs = {name: GraphEntry([], [], []) for name in names[:2] + prune + names[2:]}
    return manifest


# ----------------------------------------------------------------------------- export


def export_model(loaded: LoadedModel, output: Path, settings: ExportSettings, *, force: bool = False,
                 progress: Callable[[str], None] = _noop) -> Path:
    """Export ``loaded`` into ``output`` (atomically: `fsr.files.OutputFolder`). Returns the export folder.

    Everything is written into a temporary folder beside ``output`` and moved into place in
    one step at the end, so a failure or an interrupt never leaves a half-written export;
    ``force`` replaces only an earlier export, never another folder.
    """
    settings.validate()
    output = Path(output)
    with OutputFolder(output, force=force, note=progress) as out:
        _export_into(loaded, out.path, settings, progress)
        progress("moving the export into place")
        out.commit()
    return output


def _in_dtype(loaded: LoadedModel, dtype) -> LoadedModel:
    """``loaded`` in ``dtype``, leaving the caller's model as it was.

    A model already in ``dtype`` (``fsr-export`` loads checkpoints and builds presets in the
    export dtype) is used as it is: no copy. Otherwise each floating-point parameter and buffer
    is converted straight into a new tensor of ``dtype`` (the module structure is copied around
    them), so the only extra memory is the converted weights, never a second full-precision copy.
    """
    if next(loaded.model.parameters()).dtype == dtype:
        return loaded
    return dataclasses.replace(loaded, model=converted_copy(loaded.model, dtype),
                               clip=converted_copy(loaded.clip, dtype) if loaded.clip is not None else None)


def converted_copy(module: torch.nn.Module, dtype) -> torch.nn.Module:
    """A copy of ``module`` whose floating-point tensors are ``dtype``, made without copying them in their
    own dtype first (``copy.deepcopy`` with the converted tensors in its memo)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        if id(p) not in memo:
            data = p.detach().to(dtype) if p.is_floating_point() else p.detach().clone()
            memo[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = b.to(dtype) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


def _export_into(loaded: LoadedModel, root: Path, settings: ExportSettings, progress) -> None:
    spec = get_spec(loaded.family)
    loaded = _in_dtype(loaded, TORCH_DTYPES[settings.dtype])
    manifest = describe(loaded, settings)
    tjs = settings.format == transformers_js.TRANSFORMERS_JS
    if tjs:  # refused before anything is traced
        transformers_js.check_exportable(manifest, f"method {settings.method!r}", spec.supports_transformers_js)

    progress("saving the source model (HF checkpoint + processor)")
    spec.save_source(loaded, root / SOURCE_DIR, spec.clip_subfolder)

    paths: dict[str, Path] = {}
    forms: dict[str, dict[str, Path]] = {}
    for graph in spec.graphs(loaded, manifest):
        progress(_step(graph))
        paths[graph.name], forms[graph.name] = trace_graph(graph, root)

    if tjs:
        progress("writing the Transformers.js layout (onnx/, config.json, processor and tokenizer files)")
        processor = spec.transformers_js_processor(loaded, manifest.image.kept_image_tokens)
        paths, forms = transformers_js.write_layout(root, manifest, paths, processor, forms)

    progress("sharing the weights several graphs hold (one copy on disk)")
    parameters = ((name, p.detach().cpu().numpy()) for name, p in loaded.model.named_parameters())
    shared = share_weights(root, paths, parameters, refer_to_stored=not tjs)

    progress("checking every graph (onnx.checker, full)")
    for name, path in paths.items():
        for p in [path, *forms[name].values()]:
            onnx.checker.check_model(str(p), full_check=True)

    progress("writing manifest.json")
    records: dict[Path, FileRecord] = {}  # a weight file several graphs refer to is hashed once
    manifest.graphs = {name: graph_entry(path, root, forms[name],
                                         shared_index=shared is not None and name in shared["graphs"], records=records)
                       for name, path in paths.items()}
    if tjs:
        for name, entry in manifest.graphs.items():
            entry.aliases = transformers_js.aliases(name)
    manifest.source = SourceInfo(SOURCE_DIR, hash_folder(root, SOURCE_DIR))
    write_manifest(root, manifest)


def _step(graph: GraphSpec) -> str:
    if graph.role == "decoder":
        first, last = graph.module.start, graph.module.stop - 1
        return f"tracing the {graph.name} graph (LLM layers {first}..{last}, prefill + decode)"
    if graph.role == "prune":
        return f"tracing the {graph.name} graph (the pruning op alone, per gathered row)"
    if graph.role == "pruning":
        return f"tracing the {graph.name} graph (pruning between decoder segments)"
    what = {"vision": "vision", "embed": "token-embedding", "text_encoder": "CLIP text-encoder"}[graph.role]
    return f"tracing the {what} graph"


def trace_graph(graph: GraphSpec, root: Path) -> tuple[Path, dict[str, Path]]:
    """Trace one graph into ``root/<name>.onnx`` (its forms into ``root/<name>.<form>.onnx``, sharing
    its weight file); the vision graph then gets the method's op (and, for a method that runs before
    the projector, the projector after it). Returns the graph's path and its forms' paths."""
    path = root / f"{graph.name}.onnx"
    kwargs = graph.example_kwargs() if graph.example_kwargs else None
    if not graph.forms:
        trace_to_onnx(graph.module, graph.example_inputs(), path, input_names=graph.input_names,
                      output_names=graph.output_names, dynamic_shapes=graph.dynamic_shapes, kwargs=kwargs,
                      optional=graph.optional_inputs, translations=graph.translations() if graph.translations else None)
    else:
        model = _trace(graph, kwargs)
        traced = {}
        for key, form in graph.forms.items():
            traced[key] = (root / f"{graph.name}.{key}.onnx", _trace(form, kwargs))
        save_forms(path, model, traced, external=True)
        del model, traced
    if graph.finish is not None:
        save_onnx(graph.finish(onnx.load(path)), path)
    if graph.attach is not None:
        model = finalize(graph.attach(gs.import_onnx(onnx.load(path))))
        if graph.projector is not None:
            model = append_projector(model, graph.projector, root)
        save_onnx(model, path)
    return path, {key: root / f"{graph.name}.{key}.onnx" for key in graph.forms}


def _trace(graph: GraphSpec, kwargs: dict | None):
    return trace(graph.module, graph.example_inputs(), name=graph.name, input_names=graph.input_names,
                 output_names=graph.output_names, dynamic_shapes=graph.dynamic_shapes, kwargs=kwargs,
                 optional=graph.optional_inputs, translations=graph.translations() if graph.translations else None)


def append_projector(model: onnx.ModelProto, projector, root: Path) -> onnx.ModelProto:
    """``model``'s first output (the pruned vision features [B, K, F] of a method placed before the
    projector) through ``projector``, traced on its own and merged in: outputs ``image_tokens`` [B, K, H]
    and the method's other outputs."""
    graph = gs.import_onnx(model)
    features = graph.outputs[0]
    features.name = PRUNED_FEATURES
    others = [t.name for t in graph.outputs[1:]]
    model = gs.export_onnx(graph)
    width = features.shape[-1]
    if not isinstance(width, int):
        raise ExportConfigError(f"the method's pruned features have no static width ({features.shape}); the "
                                "projector cannot be traced after them")
    dtype = next(projector.parameters()).dtype
    tail_path = root / ".projector.onnx"
    tokens = {0: torch.export.Dim("batch"), 1: torch.export.Dim("kept_tokens")}
    try:
        trace_to_onnx(projector, (torch.randn(2, 5, width, dtype=dtype),), tail_path, input_names=[PRUNED_FEATURES],
                      output_names=["image_tokens"], dynamic_shapes=(tokens,))
        tail = onnx.load(tail_path)
    finally:
        tail_path.unlink(missing_ok=True)
    model.ir_version = tail.ir_version
    merged = onnx.compose.merge_models(model, tail, io_map=[(PRUNED_FEATURES, PRUNED_FEATURES)],
                                       prefix2="projector/", outputs=["projector/image_tokens", *others])
    merged_graph = gs.import_onnx(merged)
    by_name = {t.name: t for t in merged_graph.outputs}
    tokens = by_name["projector/image_tokens"]
    tokens.name = "image_tokens"
    merged_graph.outputs = [tokens, *(by_name[n] for n in others)]
    return finalize(merged_graph)


#: what can run each graph form (``GraphForm.runtime``)
FORM_RUNTIMES = {"ort": "onnxruntime"}


def graph_entry(path: Path, root: Path, forms: dict[str, Path] | None = None, shared_index: bool = False,
                records: dict[Path, FileRecord] | None = None) -> GraphEntry:
    """Inputs, outputs, files and hashes of one written graph: the graph, the external data files it
    refers to (its own, the shared weights), when it holds shared weights their index; and its forms
    (sharing its weight file). Inputs with an initializer (a default value) are ``optional_inputs``."""
    model = onnx.load(path, load_external_data=False)
    extra = [path.parent / f for f in referenced_files(path)] + ([root / SHARED_INDEX] if shared_index else [])
    records = {} if records is None else records
    for p in [path, *extra]:
        if p.is_file() and p not in records:
            records[p] = file_record(root, p)
    files: list[FileRecord] = [records[p] for p in [path, *extra] if p.is_file()]
    defaults = {t.name for t in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in defaults]
    optional = [_tensor(v) for v in model.graph.input if v.name in defaults]
    entry_forms = {}
    for key, form_path in (forms or {}).items():
        entry_forms[key] = GraphForm([file_record(root, form_path), *files[1:]], FORM_RUNTIMES.get(key, ""))
    return GraphEntry(files, inputs, [_tensor(v) for v in model.graph.output], optional, entry_forms)


def _tensor(v: onnx.ValueInfoProto) -> TensorInfo:
    t = v.type.tensor_type
    return TensorInfo(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      [d.dim_param or d.dim_value for d in t.shape.dim])
