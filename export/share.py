"""Weights that several graphs of an export hold, written once and shared.

A method that prunes inside the LLM adds graphs that run the LLM's own weights (PIO-FVLM's
pruning graph holds its proxy layer, the final norm and the LM head: the tensors the decoder
segments hold for them, byte for byte). `share_weights` finds every float tensor (at least
`MIN_BYTES`) that two or more graphs hold with the same type, shape and bytes, and

- writes each of them once into ``shared_weights.data`` (offsets aligned to `ALIGN` bytes);
- gives it one canonical name in every graph that holds it: ``shared/<parameter name>`` (with
  ``.T`` for a transposed weight, as ``x @ W^T`` graphs hold it) when the bytes are those of
  exactly one parameter of the model, else ``shared/<digest of type, shape and bytes>``;
- turns those initializers into external-data references to the shared file (the graphs'
  other tensors stay where they were);
- writes ``shared_weights.json``: the tensors (offset, length, dtype, shape) and which graph
  uses which, so a runtime can load each once and give the same buffer to every graph.

A tensor that another graph already stores in a weight file of its own (a decoder segment
with its fused ONNX Runtime form keeps its weights in ``<segment>.onnx.data``, shared by both
forms) is not written again: the graphs that hold it inline refer to those bytes in that file
(`stored_tensors` finds them, reading only the first elements of each same-shaped tensor
unless they match).

On disk the shared tensors exist once. ONNX Runtime loads each once when the backend
registers it for every session (``SessionOptions.add_initializer``, see
``fsr.runtime.onnxrt``); TensorRT engines each own their weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fsr.onnx_io import IR_VERSION, SHARED_WEIGHTS_DATA as SHARED_DATA, SHARED_WEIGHTS_INDEX as SHARED_INDEX, TWO_GB
MIN_BYTES = 1024
ALIGN = 4096
SHARED_PREFIX = "shared/"
PREFIX_ELEMENTS = 16  # first elements compared before a parameter is hashed whole
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE)


def _key(tensor: onnx.TensorProto) -> tuple | None:
    if tensor.data_type not in FLOAT_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    raw = numpy_helper.to_array(tensor).tobytes() if not tensor.raw_data else tensor.raw_data
    if len(raw) < MIN_BYTES:
        return None
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest(), raw[:PREFIX_ELEMENTS * itemsize]


def parameter_names(parameters, keys) -> dict[tuple, list[str]]:
    """``key -> names`` of the model's parameters (``(name, numpy array)`` pairs) whose bytes are a
    shared tensor's (``keys``: ``(onnx type, shape, sha256, first bytes)``), as they are or transposed
    (``name.T``). Only parameters whose first elements match are hashed whole."""
    wanted: dict[tuple, list[tuple]] = {}
    for key in keys:
        wanted.setdefault((key[0], key[1]), []).append(key)
    out: dict[tuple, list[str]] = {}
    for name, array in parameters:
        forms = [(name, array, lambda a: a.reshape(-1)[:PREFIX_ELEMENTS])]
        if array.ndim == 2:  # contiguous(a.T) starts with a's first column
            forms.append((f"{name}.T", array.T, lambda a: a[:PREFIX_ELEMENTS, 0]))
        for label, form, head in forms:
            candidates = wanted.get((onnx.helper.np_dtype_to_tensor_dtype(form.dtype), tuple(form.shape)), [])
            first = np.ascontiguousarray(head(array)).tobytes() if candidates else b""
            for key in candidates:
                if key[3].startswith(first) and \
                        hashlib.sha256(np.ascontiguousarray(form).tobytes()).hexdigest() == key[2]:
                    out.setdefault(key, []).append(label)
    return out


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def stored_tensors(root: Path, models: dict[str, onnx.ModelProto], keys) -> dict[tuple, tuple[str, int, int]]:
    """``key -> (file, offset, length)`` for the inline tensors ``keys`` (`_key` tuples) whose bytes a
    graph already stores as external data in a file of its own (never the shared file). Only
    tensors of a wanted type and shape are read, and only their first elements unless those match."""
    wanted: dict[tuple, list[tuple]] = {}
    for key in keys:
        wanted.setdefault((key[0], key[1]), []).append(key)
    found: dict[tuple, tuple[str, int, int]] = {}
    for model in models.values():
        for tensor in model.graph.initializer:
            info = _external(tensor)
            candidates = wanted.get((tensor.data_type, tuple(tensor.dims)), []) if info else []
            candidates = [k for k in candidates if k not in found]
            if not candidates or "location" not in info or "length" not in info or info["location"] == SHARED_DATA:
                continue
            location, offset, length = info["location"], int(info.get("offset", 0)), int(info["length"])
            path = Path(root) / location
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                head = f.read(len(candidates[0][3]))
                matching = [k for k in candidates if k[3] == head]
                if not matching:
                    continue
                f.seek(offset)
                raw = f.read(length)
            digest = hashlib.sha256(raw).hexdigest()
            for key in matching:
                if key[2] == digest and len(raw) == length:
                    found[key] = (location, offset, length)
    return found


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` and its subgraphs (Loop / If bodies)."""
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, renames)
            for sub in attribute.graphs:
                _rename(sub, renames)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)


def share_weights(root: Path, paths: dict[str, Path], parameters=(), refer_to_stored: bool = True) -> dict | None:
    """Share the tensors that two or more of ``paths`` (graph name -> ONNX file in ``root``) hold.

    ``parameters``: ``(name, numpy array)`` pairs of the model (canonical names).
    ``refer_to_stored``: point inline tensors at the bytes another graph keeps in its own weight file
    (off for a layout whose reader expects each graph's external data in files of its own:
    Transformers.js). Rewrites the graphs in place; returns the index written to
    ``shared_weights.json`` (None when nothing is shared: no file is written).
    """
    # external tensors (a graph's own weight file: the decoder's, shared with its other forms) are
    # never candidates (`_key`): they are not loaded, and stay as they are
    models = {name: onnx.load(path, load_external_data=False) for name, path in paths.items()}
    users: dict[tuple, list[str]] = {}
    for name, model in models.items():
        for key in {k for k in map(_key, model.graph.initializer) if k is not None}:
            users.setdefault(key, []).append(name)
    # bytes a graph already keeps in a file of its own: referred to there, not written again
    stored = stored_tensors(root, models, list(users)) if refer_to_stored else {}
    referred = _refer_to_stored(models, stored)
    shared = [key for key, graphs in users.items() if len(graphs) > 1 and key not in stored]
    if not shared:
        for name in referred:
            _save(models[name], paths[name])
        return None
    known = parameter_names(parameters, shared)
    canonical: dict[tuple, str] = {}
    for key in shared:  # a parameter's name, else a digest of type, shape and bytes (one name per key)
        labels = known.get(key, [])
        digest = hashlib.sha256(repr(key[:3]).encode()).hexdigest()[:16]
        canonical[key] = SHARED_PREFIX + (labels[0] if len(labels) == 1 else digest)
    index = {"data": SHARED_DATA, "align": ALIGN, "tensors": {}, "graphs": {}}
    written: set[tuple] = set()
    data_path = Path(root) / SHARED_DATA
    with open(data_path, "wb") as data:
        for name, model in models.items():
            renames: dict[str, str] = {}
            keep: list[onnx.TensorProto] = []
            for tensor in model.graph.initializer:
                key = _key(tensor)
                if key is None or key not in canonical:
                    keep.append(tensor)
                    continue
                target = canonical[key]
                renames[tensor.name] = target
                if any(t.name == target for t in keep):
                    continue  # the same bytes twice in one graph: one initializer serves both
                if key not in written:
                    raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
                    offset = data.tell() + (-data.tell() % ALIGN)
                    data.seek(offset)
                    data.write(raw)
                    index["tensors"][target] = {
                        "offset": offset, "length": len(raw), "shape": list(tensor.dims),
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name}
                    written.add(key)
                record = index["tensors"][target]
                tensor.name = target
                _point_to(tensor, SHARED_DATA, record["offset"], record["length"])
                keep.append(tensor)
            if renames:
                kept = [onnx.TensorProto.FromString(t.SerializeToString()) for t in keep]
                del model.graph.initializer[:]
                model.graph.initializer.extend(kept)
                _rename(model.graph, renames)
                index["graphs"][name] = sorted(set(renames.values()))
    for name in set(index["graphs"]) | referred:  # only the graphs that now refer elsewhere are rewritten
        _save(models[name], paths[name])
    (Path(root) / SHARED_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _refer_to_stored(models: dict[str, onnx.ModelProto], stored: dict[tuple, tuple[str, int, int]]) -> set[str]:
    """Turn every inline tensor whose bytes are ``stored`` into a reference to them; the graphs changed."""
    changed: set[str] = set()
    for name, model in models.items():
        for tensor in model.graph.initializer:
            key = _key(tensor)
            if key is None or key not in stored:
                continue
            _point_to(tensor, *stored[key])
            changed.add(name)
    return changed


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` external data: ``length`` bytes at ``offset`` of ``location`` (its inline data dropped)."""
    for field in ("raw_data", "float_data", "int32_data", "double_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for field, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = field, str(value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph whose shared tensors already point to the shared file (the rest: inline, or the
    graph's own ``.data`` file beyond 2 GB)."""
    model.ir_version = IR_VERSION
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, path)
        return
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)


def referenced_files(path: Path) -> list[str]:
    """The external-data files a graph refers to (relative to its folder), in first-use order."""
    model = onnx.load(path, load_external_data=False)
    seen: dict[str, None] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                seen.setdefault(location, None)
    return list(seen)
