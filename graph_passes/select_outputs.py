"""Keep some graph outputs (renamed), drop the others and the inputs left unused."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def select_outputs(graph: gs.Graph, keep: dict[str, str]) -> gs.Graph:
    """``keep`` maps existing output names to their new names, in output order."""
    by_name = {t.name: t for t in graph.outputs}
    missing = [n for n in keep if n not in by_name]
    if missing:
        raise ValueError(f"graph {graph.name!r} has no output(s) {missing}; it has {list(by_name)}")
    outputs = []
    for old, new in keep.items():
        tensor = by_name[old]
        tensor.name = new
        outputs.append(tensor)
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)  # keep the op signature whole
    return graph
