"""Turn the ``fsr::FocusScanRefine`` function node into a TensorRT plugin node.

Before::

    tokens, features, saliency, relevance ─► FocusScanRefine (domain fsr) ─► image_tokens, kept_indices
                                              body: ONNX local function fsr.FocusScanRefine

After::

    tokens, features, saliency, relevance ─► FocusScanRefine (domain fsr) ─► image_tokens, kept_indices
                                              attrs + plugin_version "1", plugin_namespace "fsr"
                                              no body: TensorRT's ONNX parser finds no importer and no
                                              local function for it, so it asks the plugin registry for
                                              creator "FocusScanRefine", version "1", namespace "fsr"

The op type is the plugin's name; the node keeps its inputs, outputs, name and
attributes (``budget, alpha, beta, rho, kappa, keep_ratio``), so the plugin reads the
attributes the function body reads. An omitted ``relevance`` (an empty fourth input name,
or the constant row the splice pass wires instead: `splice_fsr.is_neutral_relevance`)
is dropped, as the plugin takes three inputs for "no relevance". Every other node is left
as it was (the constant row's producers go when nothing else reads them).

Names (op, domain, version, attributes) come from the op's identity file
(`fsr.pruning.fsr_identity`), which the plugin's creator is generated from too.

The result is for TensorRT only (with ``libfsr_plugin.so`` loaded): ONNX Runtime has no
kernel for the op. ``onnx.checker`` accepts it with ``full_check``: the ``fsr`` domain is
imported, and (non-strict) shape inference passes over an op without schema, keeping
the output types and shapes the graph already declares.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from fsr.graph_passes.splice_fsr import is_neutral_relevance
from fsr.pruning.fsr_identity import FSR_DOMAIN, FSR_OP, FSR_OP_VERSION

log = logging.getLogger(__name__)

# The TensorRT plugin: name = op type, namespace = ONNX domain, version = op version.
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = FSR_OP, str(FSR_OP_VERSION), FSR_DOMAIN
PLUGIN_ATTRS = {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


def is_fsr_node(node: gs.Node) -> bool:
    return node.op == FSR_OP and (node.domain or "") == FSR_DOMAIN


def fsr_function_to_plugin(graph: gs.Graph) -> gs.Graph:
    """Replace every FocusScanRefine function call by a plugin node; drop the function body.

    Logs how many nodes it changed (0 for a graph without FSR, which it leaves as is).
    """
    nodes = [n for n in graph.nodes if is_fsr_node(n)]
    dropped = False
    for node in nodes:
        node.op = PLUGIN_NAME
        node.attrs.update(PLUGIN_ATTRS)
        while len(node.inputs) > 3 and (not node.inputs[-1].name or is_neutral_relevance(node.inputs[-1])):
            dropped |= bool(node.inputs.pop().name)  # omitted relevance: 3 inputs for the plugin
    if dropped:
        graph.cleanup(remove_unused_graph_inputs=False, recurse_functions=False)  # the constant row's producers
    if nodes:
        graph.functions = [f for f in graph.functions if not (f.domain == FSR_DOMAIN and f.name == FSR_OP)]
    log.info("fsr_function_to_plugin: %d FocusScanRefine node(s) now call plugin %s::%s v%s",
             len(nodes), PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION)
    return graph


def count_plugin_nodes(model: onnx.ModelProto) -> int:
    """Number of FocusScanRefine nodes that carry the plugin attributes."""
    return sum(1 for n in model.graph.node if n.op_type == PLUGIN_NAME and n.domain == FSR_DOMAIN
               and {a.name for a in n.attribute} >= set(PLUGIN_ATTRS))


def check_plugin_model(model: onnx.ModelProto) -> None:
    """The full ``onnx.checker`` (see the module docstring)."""
    onnx.checker.check_model(model, full_check=True)
