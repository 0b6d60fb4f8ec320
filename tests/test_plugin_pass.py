"""fsr_function_to_plugin: the FSR function node becomes a TensorRT plugin node, nothing else changes."""

from __future__ import annotations

import logging
import shutil

import onnx
import onnx_graphsurgeon as gs
import pytest

from fsr.graph_passes.fsr_to_plugin import (
    PLUGIN_NAME, check_plugin_model, count_plugin_nodes, fsr_function_to_plugin,
)


def _signature(node: onnx.NodeProto):
    attrs = sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute
                   if a.type != onnx.AttributeProto.GRAPH)
    return node.name, node.domain, node.op_type, list(node.input), list(node.output), attrs


def _run_pass(model: onnx.ModelProto, caplog) -> onnx.ModelProto:
    with caplog.at_level(logging.INFO, logger="fsr.graph_passes.fsr_to_plugin"):
        out = gs.export_onnx(fsr_function_to_plugin(gs.import_onnx(model)))
    out.ir_version = model.ir_version
    return out


def test_fsr_node_becomes_plugin_node(export_fsr64, caplog):
    model = onnx.load(export_fsr64 / "vision.onnx")
    assert [f.name for f in model.functions] == ["FocusScanRefine"]
    out = _run_pass(model, caplog)
    assert "1 FocusScanRefine node(s)" in caplog.text

    [node] = [n for n in out.graph.node if n.op_type == PLUGIN_NAME]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"fsr"
    assert attrs["budget"] == 64 and {"alpha", "beta", "rho", "kappa"} <= set(attrs)
    assert node.domain == "fsr" and list(node.output) == ["image_tokens", "kept_indices"]
    assert len(out.functions) == 0  # no body left: TensorRT must take the plugin
    assert count_plugin_nodes(out) == 1

    # every node, the FSR node apart, is unchanged and in the same order
    before = [_signature(n) for n in model.graph.node]
    after = [_signature(n) for n in out.graph.node]
    assert len(before) == len(after)
    differ = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(differ) == 1 and differ[0][0][2] == "FocusScanRefine"
    fsr_before, fsr_after = differ[0]
    assert fsr_before[:5] == fsr_after[:5]  # same name, domain, op type, inputs, outputs
    assert set(fsr_after[5]) - set(fsr_before[5]) == {("plugin_namespace", b"fsr"), ("plugin_version", b"1")}
    assert [i.name for i in out.graph.initializer] == [i.name for i in model.graph.initializer]
    assert [(v.name, v.type) for v in out.graph.output] == [(v.name, v.type) for v in model.graph.output]

    check_plugin_model(out)  # full onnx.checker
    onnx.checker.check_model(out, full_check=True)


def test_pass_does_not_fire_without_fsr(export_none, caplog):
    model = onnx.load(export_none / "vision.onnx")
    out = _run_pass(model, caplog)
    assert "0 FocusScanRefine node(s)" in caplog.text
    assert [_signature(n) for n in out.graph.node] == [_signature(n) for n in model.graph.node]
    assert len(out.functions) == len(model.functions) == 0
    assert count_plugin_nodes(out) == 0


def test_omitted_relevance_is_dropped_from_the_plugin_inputs():
    import numpy as np

    names = ("tokens", "features", "saliency")
    inputs = [gs.Variable(n, np.float32, [1, 8, 4] if n != "saliency" else [1, 8]) for n in names]
    outputs = [gs.Variable("pruned", np.float32, [1, 2, 4]), gs.Variable("kept_indices", np.int64, [1, 2])]
    node = gs.Node("FocusScanRefine", domain="fsr", attrs={"budget": 2},
                   inputs=[*inputs, gs.Variable.empty()], outputs=outputs)
    other = gs.Node("Relu", inputs=[inputs[0]], outputs=[gs.Variable("r", np.float32, [1, 8, 4])])
    graph = gs.Graph(nodes=[node, other], inputs=inputs, outputs=[*outputs, other.outputs[0]],
                     import_domains=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("fsr", 1)])
    fsr_function_to_plugin(graph)
    assert [t.name for t in node.inputs] == list(names) and node.op == PLUGIN_NAME
    assert other.op == "Relu" and other.inputs == [inputs[0]]
    check_plugin_model(gs.export_onnx(graph))


def test_constant_relevance_row_is_dropped_with_its_producers():
    """The splice pass wires a constant row for an omitted relevance (TensorRT's parser takes
    no empty input on a function call); the plugin pass gives the plugin 3 inputs again."""
    import numpy as np

    from fsr.graph_passes import splice_focus_scan_refine

    x = gs.Variable("x", np.float32, ["batch", 12, 5])
    features, tokens = gs.Variable("features", np.float32, ["batch", 12, 5]), gs.Variable("tokens", np.float32)
    saliency = gs.Variable("saliency", np.float32, ["batch", 12])
    axes = gs.Constant("axes", np.array([-1], np.int64))
    w = gs.Constant("w", np.ones((5, 3), np.float32))
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[features]),
                            gs.Node("MatMul", inputs=[features, w], outputs=[tokens]),
                            gs.Node("ReduceMean", inputs=[x, axes], outputs=[saliency], attrs={"keepdims": 0})],
                     inputs=[x], outputs=[tokens, features, saliency], opset=18, name="toy")
    tokens.shape = ["batch", 12, 3]
    graph = splice_focus_scan_refine(graph, budget=4, use_relevance=False)
    node = next(n for n in graph.nodes if n.op == "FocusScanRefine")
    assert node.inputs[3].name == "relevance_neutral"
    fsr_function_to_plugin(graph)
    assert [t.name for t in node.inputs] == ["tokens", "features", "saliency"]
    assert not {"Shape", "ConstantOfShape"} & {n.op for n in graph.nodes}
    assert {"Relu", "MatMul", "ReduceMean"} <= {n.op for n in graph.nodes}
    check_plugin_model(gs.export_onnx(graph))


def test_tensorrt_parser_looks_the_node_up_as_a_plugin(export_fsr64, tmp_path, caplog):
    """Without the plugin library loaded, TensorRT's parser fails exactly at the plugin lookup
    (name, version, namespace), which shows the node is routed to the plugin registry."""
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt, make_logger

    try:
        trt = import_tensorrt()
    except TensorRTMissing as exc:
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")
    if trt.module.get_plugin_registry().get_creator("FocusScanRefine", "1", "fsr") is not None:
        pytest.skip("the FocusScanRefine plugin is loaded in this process; the lookup would succeed")
    path = tmp_path / "vision.plugin.onnx"
    onnx.save(_run_pass(onnx.load(export_fsr64 / "vision.onnx"), caplog), path)
    logger = make_logger(trt)
    builder = trt.module.Builder(logger)
    network = builder.create_network(1 << int(trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.module.OnnxParser(network, logger)
    assert not parser.parse_from_file(str(path))
    errors = " ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
    assert "FocusScanRefine" in errors and "Plugin not found" in errors


def test_write_plugin_graph_records_it_once(export_fsr64, export_none, tmp_path):
    from fsr.engines.plugin_graph import write_plugin_graph
    from fsr.manifest import read_manifest, sha256

    export = tmp_path / "fsr64"
    shutil.copytree(export_fsr64, export)
    manifest = read_manifest(export)
    record = write_plugin_graph(export, manifest)
    path = export / record.file
    assert read_manifest(export).plugin_graphs["vision"] == record == manifest.plugin_graphs["vision"]
    assert record.files == {"vision.plugin.onnx": sha256(path)}
    mtime = path.stat().st_mtime_ns
    assert write_plugin_graph(export, read_manifest(export)) == record and path.stat().st_mtime_ns == mtime
    check_plugin_model(onnx.load(path))
    read_manifest(export, verify=True)  # the export's own graphs are untouched

    none = tmp_path / "none"
    shutil.copytree(export_none, none)
    assert write_plugin_graph(none, read_manifest(none)) is None
    assert not (none / "vision.plugin.onnx").exists()
