"""The Transformers.js layout: an export that `@huggingface/transformers` loads as it is.

``fsr-export llava ... --format transformers.js`` writes one folder that is both an export
of ours (``manifest.json`` points at the graph files: ``fsr-run``, ``fsr-build`` and
``fsr-compare`` read it as they read a native one) and a model folder that Transformers.js
(4.3.2, Node or browser) opens with ``from_pretrained`` offline, with no user code::

    manifest.json                    our manifest (layout "transformers.js", graph files below)
    source/                          the source model as a standard HF checkpoint (our runtime's processor)
    config.json                      source/config.json + "transformers.js_config" (dtype, external data)
    generation_config.json           as in source/
    preprocessor_config.json         the image processor's flat keys + processor_class
    processor_config.json            image_token, patch_size, num_additional_image_tokens: <image> -> K tokens
    tokenizer.json, tokenizer_config.json   the tokenizer, the chat template inlined
    onnx/vision_encoder.onnx         pixel_values -> image_features [B,K,H] (+ kept_indices)
    onnx/embed_tokens.onnx           input_ids -> inputs_embeds
    onnx/decoder_model_merged.onnx   inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
                                     -> logits, present.{i}.key/value (batch dim named ``batch_size``)

An fp16 export writes ``*_fp16.onnx`` instead (``transformers.js_config.dtype`` says so) and
its vision encoder takes float32 ``pixel_values`` (cast inside), as Transformers.js feeds them.

What Transformers.js needs, and what this module does for it (measured with 4.3.2, Node 20):

- it reads the vision encoder's output by the name ``image_features``: our ``image_tokens``
  is renamed in the file and the manifest's graph entry maps the name back
  (`fsr.manifest.GraphEntry.aliases`), so our runtime reads the file unchanged;
- it builds the empty KV cache from the decoder's past inputs, with the dimension named
  ``batch_size`` set to the batch and every other symbolic one to 0;
- it gives the vision encoder ``pixel_values`` only: an export that needs
  ``instruction_embeds`` (FSR's instruction relevance) is refused with the fix
  (``--relevance none``: the spec's "relevance omitted", phi = s_hat^beta);
- its LLaVA processor expands ``<image>`` to floor(H/patch_size)*floor(W/patch_size) +
  num_additional_image_tokens tokens and ignores ``image_seq_length``: the family's spec says
  which values give K (`fsr.models.spec.ModelSpec.transformers_js_processor`).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from fsr.errors import FsrError
from fsr.files import atomic_write
from fsr.manifest import SOURCE_DIR, Manifest
from fsr.onnx_io import IR_VERSION
from fsr.settings import FORMATS

NATIVE, TRANSFORMERS_JS = FORMATS
#: ``Manifest.layout`` of each format
LAYOUTS = {NATIVE: "fsr", TRANSFORMERS_JS: "transformers.js"}
SUBFOLDER = "onnx"
#: our graph name -> Transformers.js's session file name
FILE_NAMES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}
#: tensors Transformers.js reads by another name: graph -> {our name: its name}
RENAMED = {"vision": {"image_tokens": "image_features"}}
BATCH_DIM = "batch_size"  # the dim name Transformers.js sets to the batch when it builds the empty cache
#: files of source/ copied to the top level as they are (those that exist)
COPIED = ("generation_config.json", "tokenizer.json", "special_tokens_map.json")
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16"}


class LayoutError(FsrError, ValueError):
    """The export cannot be written in the Transformers.js layout; the message says why and what to do."""


def check_exportable(manifest: Manifest, method_label: str, supports: bool) -> None:
    """Refuse (before anything is traced) an export Transformers.js could not run without user code."""
    if not supports:
        raise LayoutError(f"--format {TRANSFORMERS_JS}: the {manifest.family!r} family has no Transformers.js "
                          f"layout (Transformers.js runs no such model as it is); use --format {NATIVE}")
    if manifest.relevance.source is not None:
        raise LayoutError(f"--format {TRANSFORMERS_JS}: {method_label} reads instruction relevance "
                          f"({manifest.relevance.source}), but Transformers.js gives the vision encoder pixel_values "
                          "only; pass --relevance none (the relevance term omitted: phi = s_hat^beta) or use "
                          f"--format {NATIVE}")
    if len(manifest.decoder_segments) != 1:
        raise LayoutError(f"--format {TRANSFORMERS_JS}: Transformers.js runs one decoder graph; this export has "
                          f"{len(manifest.decoder_segments)} decoder segments (a method that prunes inside the LLM "
                          f"needs our runtime); use --format {NATIVE}")
    unknown = sorted(set(manifest.graphs) - set(FILE_NAMES))
    if unknown:
        raise LayoutError(f"--format {TRANSFORMERS_JS}: Transformers.js has no session for graph(s) {unknown}; "
                          f"use --format {NATIVE}")


def aliases(name: str) -> dict[str, str]:
    """Graph ``name``'s renamed tensors, file name -> our name (`fsr.manifest.GraphEntry.aliases`)."""
    return {new: old for old, new in RENAMED.get(name, {}).items()}


def graph_file(name: str, dtype: str) -> str:
    """The path (relative to the export) of graph ``name`` in this layout."""
    return f"{SUBFOLDER}/{FILE_NAMES[name]}{DTYPE_SUFFIX[dtype]}.onnx"


def write_layout(root: Path, manifest: Manifest, paths: dict[str, Path], processor_config: dict,
                 forms: dict[str, dict[str, Path]] | None = None) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """Move the traced graphs ``paths`` (name -> ``root/<name>.onnx``) and their other forms
    (name -> {form: ``root/<name>.<form>.onnx``}, e.g. the decoder's ONNX Runtime form, which shares
    the graph's weight file) into the layout, adapted for Transformers.js, and write the top-level
    JSON files. Returns the new paths of the graphs and of their forms."""
    moved: dict[str, Path] = {}
    moved_forms: dict[str, dict[str, Path]] = {}
    external: dict[str, int] = {}
    for name, path in paths.items():
        target = root / graph_file(name, manifest.dtype)
        graph_forms = (forms or {}).get(name, {})
        chunks = convert_graph(path, target, name, fp16=manifest.dtype == "fp16", forms=graph_forms)
        if chunks:
            external[target.name] = chunks
        moved[name] = target
        moved_forms[name] = {key: form_file(target, key) for key in graph_forms}
    write_configs(root, manifest, processor_config, external)
    return moved, moved_forms


def form_file(target: Path, key: str) -> Path:
    """Where the ``key`` form of the graph at ``target`` goes (beside it; Transformers.js does not read it)."""
    return target.with_name(f"{target.stem}.{key}.onnx")


def convert_graph(path: Path, target: Path, name: str, *, fp16: bool, forms: dict[str, Path] | None = None) -> int:
    """``path`` -> ``target`` with Transformers.js's names (and a float32 ``pixel_values`` for an fp16
    vision encoder); ``path`` and its external data are removed. Each of ``forms`` ({key: path}, other
    forms sharing ``path``'s external data) moves to `form_file` and refers to the moved data. Returns
    the number of external data files (0 or 1: ``<target>_data``, the name Transformers.js looks for)."""
    model = onnx.load(str(path), load_external_data=False)
    _adapt(model.graph, name, fp16=fp16)
    data = path.with_name(path.name + ".data")
    new_data = target.with_name(target.name + "_data")
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = 0
    if data.is_file():
        data.replace(new_data)
        _relocate(model.graph, data.name, new_data.name)
        chunks = 1
    for key, form_path in (forms or {}).items():
        form = onnx.load(str(form_path), load_external_data=False)
        _adapt(form.graph, name, fp16=fp16)
        _relocate(form.graph, data.name, new_data.name)
        form.ir_version = min(form.ir_version, IR_VERSION)
        onnx.save_model(form, str(form_file(target, key)))
        form_path.unlink()
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(target))
    path.unlink()
    return chunks


def _relocate(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point the graph's external tensors stored in file ``old`` at file ``new``."""
    for tensor in _external_tensors(graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new


def _adapt(graph: onnx.GraphProto, name: str, *, fp16: bool) -> None:
    """Transformers.js's tensor and dim names, float32 pixels for an fp16 vision encoder."""
    for old, new in RENAMED.get(name, {}).items():
        _rename_tensor(graph, old, new)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_param = BATCH_DIM
    if fp16 and name == "vision":
        _float32_pixels(graph)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def _float32_pixels(graph: onnx.GraphProto) -> None:
    """The vision encoder's ``pixel_values`` input becomes float32, cast to the graph's dtype inside."""
    (pixels,) = [i for i in graph.input if i.name == "pixel_values"]
    inner_type = pixels.type.tensor_type.elem_type
    if inner_type == onnx.TensorProto.FLOAT:
        return
    inner = "pixel_values_cast"
    for node in graph.node:
        node.input[:] = [inner if n == "pixel_values" else n for n in node.input]
    pixels.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    graph.node.insert(0, onnx.helper.make_node("Cast", ["pixel_values"], [inner], name="pixel_values_cast",
                                               to=inner_type))


def _external_tensors(graph: onnx.GraphProto):
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t


def write_configs(root: Path, manifest: Manifest, processor_config: dict, external: dict[str, int]) -> None:
    """The top-level JSON files Transformers.js reads, from ``source/`` and the family's processor keys."""
    source = root / SOURCE_DIR
    for name in COPIED:
        if (source / name).is_file():
            atomic_write(root / name, (source / name).read_bytes())
    config = _read(source / "config.json")
    config["transformers.js_config"] = {"dtype": manifest.dtype, **(
        {"use_external_data_format": external} if external else {})}
    _write(root / "config.json", config)

    image_processor = _image_processor(source)
    _write(root / "preprocessor_config.json", {**image_processor, "processor_class": processor_config["processor_class"]})
    _write(root / "processor_config.json", processor_config)

    tokenizer = _read(source / "tokenizer_config.json")
    template = source / "chat_template.jinja"
    if template.is_file():
        tokenizer["chat_template"] = template.read_text()
    elif (source / "chat_template.json").is_file():
        tokenizer["chat_template"] = _read(source / "chat_template.json")["chat_template"]
    if "chat_template" not in tokenizer:
        raise LayoutError(f"{source} has no chat template (chat_template.jinja or in tokenizer_config.json); "
                          "Transformers.js needs one to format prompts: use a checkpoint with one")
    _write(root / "tokenizer_config.json", tokenizer)


def _image_processor(source: Path) -> dict:
    """The flat image-processor keys (``preprocessor_config.json``, or the ``image_processor`` object of
    ``processor_config.json`` as transformers 5 saves it)."""
    if (source / "preprocessor_config.json").is_file():
        return _read(source / "preprocessor_config.json")
    nested = _read(source / "processor_config.json").get("image_processor")
    if not isinstance(nested, dict):
        raise LayoutError(f"{source} holds no image processor (preprocessor_config.json, or image_processor in "
                          "processor_config.json); export from a checkpoint with its processor")
    return nested


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing; the source model must be saved with its processor and "
                          "tokenizer") from None


def _write(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
