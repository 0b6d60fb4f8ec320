"""Cut the ``fsr::FocusScanRefine`` node (and its function) out of a graph, alone.

The result is a graph whose inputs are the node's inputs and whose outputs are its
outputs: the op as it was exported, runnable on its own (tests, micro-benchmarks). A
constant relevance row (`splice_fsr.is_neutral_relevance`, what the splice pass wires when
relevance is omitted) keeps its producers, so the cut graph has the three inputs the
op really reads.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from fsr.graph_passes.splice_fsr import SpliceError, is_neutral_relevance
from fsr.pruning.fsr_identity import FSR_DOMAIN, FSR_OP


def find_fsr_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == FSR_OP and (n.domain or "") == FSR_DOMAIN]


def isolate_focus_scan_refine(graph: gs.Graph) -> gs.Graph:
    nodes = find_fsr_nodes(graph)
    if len(nodes) != 1:
        raise SpliceError(f"expected one {FSR_DOMAIN}::{FSR_OP} node in graph {graph.name!r}, found {len(nodes)}")
    node = nodes[0]
    inputs = [t for t in node.inputs if not (isinstance(t, gs.Variable) and t.name == "")
              and not is_neutral_relevance(t)]
    for t in inputs:
        t.inputs.clear()  # they become graph inputs: cut their producers off
    graph.inputs = inputs
    graph.outputs = list(node.outputs)
    graph.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)  # keep the op signature whole
    graph.functions = [f for f in graph.functions if f.name == FSR_OP and f.domain == FSR_DOMAIN]
    return graph
