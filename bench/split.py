"""Cut an exported vision graph at its pruning node (FocusScanRefine, or another method's op:
``PruningMethod.onnx_op``), to time the two sides apart.

::

    vision.onnx:   pixel_values ─► [tower] ─► tokens, features, saliency, relevance ─► [FSR] ─► image_tokens, kept_indices
    vision_prefix: pixel_values ─► [tower] ─► tokens, features, saliency, relevance
    fsr_op:                                   tokens, features, saliency, relevance ─► [FSR] ─► image_tokens, kept_indices

The op model carries the very function body the export spliced in (not a rebuilt one),
so the op is timed exactly as the vision graph runs it, on the tower's real outputs.
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper

from fsr.errors import FsrError
from fsr.onnx_io import subgraph_reads

FSR_DOMAIN, FSR_OP = "fsr", "FocusScanRefine"
FSR = (FSR_DOMAIN, FSR_OP)


class SplitError(FsrError, ValueError):
    """The graph holds no (or more than one) node of the op to cut at."""


def find_op_node(model: onnx.ModelProto, op: tuple[str, str] = FSR) -> onnx.NodeProto:
    domain, op_type = op
    nodes = [n for n in model.graph.node if n.domain == domain and n.op_type == op_type]
    if len(nodes) != 1:
        raise SplitError(f"expected one {domain}::{op_type} node in graph {model.graph.name!r}, found {len(nodes)}")
    return nodes[0]


def find_fsr_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return find_op_node(model, FSR)


def _value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    infos = {v.name: v for v in graph.value_info}
    infos.update({v.name: v for v in graph.input})
    infos.update({v.name: v for v in graph.output})
    return infos


def _needed_nodes(nodes, outputs: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes that ``outputs`` depend on (order kept) and every name they read."""
    needed, keep = set(outputs), []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    return keep[::-1], needed


def vision_prefix_model(model: onnx.ModelProto, op: tuple[str, str] = FSR) -> onnx.ModelProto:
    """The vision graph up to the op's node; its outputs are the node's inputs."""
    node = find_op_node(model, op)
    graph = model.graph
    infos = _value_infos(graph)
    outputs = [name for name in node.input if name]
    missing = [n for n in outputs if n not in infos]
    if missing:
        raise SplitError(f"no type/shape recorded for {missing}; cannot make them graph outputs")
    nodes, needed = _needed_nodes([n for n in graph.node if n is not node], set(outputs))
    new = helper.make_graph(
        nodes, f"{graph.name}_prefix",
        [i for i in graph.input if i.name in needed],
        [copy.deepcopy(infos[n]) for n in outputs],
        initializer=[t for t in graph.initializer if t.name in needed],
        value_info=[v for v in graph.value_info if v.name in needed and v.name not in outputs],
    )
    opsets = [o for o in model.opset_import if o.domain != op[0]]
    functions = [f for f in model.functions if f.domain != op[0]]
    return helper.make_model(new, opset_imports=opsets, functions=functions, ir_version=model.ir_version,
                             producer_name="fsr-bench")


def fsr_op_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FSR node alone, with the function body of ``model``; inputs named as the node's."""
    return op_model(model, FSR)


def op_model(model: onnx.ModelProto, op: tuple[str, str]) -> onnx.ModelProto:
    """The op's node alone, with the function bodies of ``model``; inputs named as the node's."""
    node = find_op_node(model, op)
    graph = model.graph
    infos = _value_infos(graph)
    names = [n for n in node.input if n] + list(node.output)
    missing = [n for n in names if n not in infos]
    if missing:
        raise SplitError(f"no type/shape recorded for {missing}")
    new = helper.make_graph(
        [copy.deepcopy(node)], f"{graph.name}_{op[1]}",
        [copy.deepcopy(infos[n]) for n in node.input if n],
        [copy.deepcopy(infos[n]) for n in node.output],
    )
    return helper.make_model(new, opset_imports=list(model.opset_import), functions=list(model.functions),
                             ir_version=model.ir_version, producer_name="fsr-bench")
