"""fsr-build: precision rewrite, profiles, TensorRT(-RTX) engine builds, manifest records, staleness.

The builds need ``tensorrt`` or ``tensorrt_rtx`` (TensorRT-RTX builds ahead of time on
this CPU-only machine) and skip without either, except in CI (CI=true), which installs
TensorRT-RTX and must prove that every graph builds. Builds run on copies of the
session's tiny exports; the fixtures themselves are never written to.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from fsr.engines.precision import cast_to_precision, convert_onnx_file
from fsr.engines.profiles import ProfileError, graph_profiles
from fsr.engines.records import StaleEngineError, check_engine_fresh, select_engine
from fsr.manifest import Manifest, ManifestError, read_manifest, sha256

MAX_BATCH, MAX_SEQ = 2, 128


def _tensorrt():
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    try:
        return import_tensorrt()
    except TensorRTMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs tensorrt-rtx (the test extra) and must build engines: {exc}")
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")


# -- precision rewrite (no TensorRT needed) ------------------------------------------------


def _elem_types(model):
    """Types of the bindings: the graph's inputs and outputs (an input with a default value, an
    initializer, is a constant to TensorRT, not a binding)."""
    defaults = {t.name for t in model.graph.initializer}
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
            if v.name not in defaults}


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _value_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in vi}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def test_fp16_rewrite_of_decoder_matches_fp32_in_onnxruntime(export_fsr64, tmp_path):
    import onnxruntime as ort

    src = export_fsr64 / "decoder.onnx"
    dst = tmp_path / "decoder.fp16.onnx"
    changed = convert_onnx_file(src, dst, "fp16")
    before, after = onnx.load(src), onnx.load(dst)
    assert changed > 0
    assert _elem_types(after) == _elem_types(before)  # bindings keep their types
    types = _value_types(after)
    matmuls = [n for n in after.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[i] == TensorProto.FLOAT16 for n in matmuls for i in n.input)
    for n in after.graph.node:  # reductions and softmax stay fp32
        if n.op_type in ("Softmax", "ReduceMean", "Pow"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.name

    rng = np.random.RandomState(0)
    feeds = {"inputs_embeds": rng.randn(2, 5, 64).astype(np.float32), "attention_mask": np.ones((2, 8), np.int64),
             "position_ids": np.tile(np.arange(3, 8), (2, 1)).astype(np.int64)}
    feeds.update({f"past_key_values.{i}.{k}": rng.randn(2, 2, 3, 16).astype(np.float32)
                  for i in range(2) for k in ("key", "value")})
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for a, b in zip(run(src), run(dst)):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, atol=2e-3 * max(1.0, np.abs(a).max()))


def test_fp16_rewrite_keeps_fsr_node_fp32_and_same_kept_indices(export_fsr64, tmp_path):
    import onnxruntime as ort

    src = export_fsr64 / "vision.onnx"
    dst = tmp_path / "vision.fp16.onnx"
    convert_onnx_file(src, dst, "fp16")
    after = onnx.load(dst)
    fsr = next(n for n in after.graph.node if n.op_type == "FocusScanRefine")
    types = _value_types(after)
    assert all(types[i] == TensorProto.FLOAT for i in fsr.input if i)  # score math stays fp32
    assert any(n.op_type == "Conv" and types[n.input[1]] == TensorProto.FLOAT16 for n in after.graph.node)

    rng = np.random.RandomState(1)
    feeds = {"pixel_values": rng.randn(2, 3, 336, 336).astype(np.float32),
             "instruction_embeds": rng.randn(2, 32).astype(np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    (tok32, idx32), (tok16, idx16) = run(src), run(dst)
    assert (idx16 == idx32).mean() > 0.9  # fp16 features may flip a near-tie, rarely
    same = idx16 == idx32
    np.testing.assert_allclose(tok16[same], tok32[same], atol=2e-3)


def test_fp16_rewrite_keeps_the_visionzip_op_fp32(export_vz64, tmp_path):
    """VisionZip's scores (cls_attention, keys) and its merge stay fp32 in an fp16 engine: the custom-domain
    node computes in fp32; the tower's and the projector's matrix products go to fp16."""
    import onnxruntime as ort

    src = export_vz64 / "vision.onnx"
    dst = tmp_path / "vision.fp16.onnx"
    convert_onnx_file(src, dst, "fp16")
    after = onnx.load(dst)
    [node] = [n for n in after.graph.node if n.op_type == "VisionZip"]
    types = _value_types(after)
    assert [types[i] for i in node.input] == [TensorProto.FLOAT] * 3
    assert types[node.output[0]] == TensorProto.FLOAT
    consumers = [n for n in after.graph.node if node.output[0] in n.input]  # the projector after the op
    assert consumers and all(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16 for n in consumers)
    assert any(n.op_type == "Conv" and types[n.input[1]] == TensorProto.FLOAT16 for n in after.graph.node)

    rng = np.random.RandomState(1)
    feeds = {"pixel_values": rng.randn(2, 3, 336, 336).astype(np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    (tok32, idx32), (tok16, idx16) = run(src), run(dst)
    assert (idx16[:, 0] == 0).all()
    for b in range(2):  # fp16 tower outputs may flip a near-tie of the attention: the dominant sets mostly agree
        a, c = set(idx32[b, :54]), set(idx16[b, :54])
        assert len(a & c) / len(a | c) > 0.9
    same = (idx16 == idx32).all(axis=1)
    assert same.any()
    np.testing.assert_allclose(tok16[same], tok32[same], atol=2e-2, rtol=2e-2)


def _toy(dtype=TensorProto.FLOAT, with_matmul=True):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])] if with_matmul else \
        [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", dtype, [2, 4])],
        [helper.make_tensor_value_info("y", dtype, [2, 4])],
        [helper.make_tensor("w", dtype, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())] if with_matmul else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_precision_rewrite_does_not_fire_on_fp16_graph():
    model = _toy(TensorProto.FLOAT16)
    graph, changed = cast_to_precision(gs.import_onnx(model), "fp16")
    out = gs.export_onnx(graph)
    assert changed == 0
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert out.graph.initializer[0].data_type == TensorProto.FLOAT16


def test_precision_rewrite_toy_counts_and_bf16(tmp_path):
    graph, changed = cast_to_precision(gs.import_onnx(_toy()), "fp16")
    assert changed == 1
    ops = [n.op for n in graph.nodes]
    assert ops.count("Cast") == 2 and "MatMul" in ops  # x -> fp16, y back to fp32
    graph, changed = cast_to_precision(gs.import_onnx(_toy(with_matmul=False)), "bf16")
    assert changed == 0 and [n.op for n in graph.nodes] == ["Relu"]
    onnx.save(_toy(), tmp_path / "toy.onnx")
    convert_onnx_file(tmp_path / "toy.onnx", tmp_path / "toy.bf16.onnx", "bf16")
    model = onnx.load(tmp_path / "toy.bf16.onnx")
    assert model.graph.initializer[0].data_type == TensorProto.BFLOAT16


# -- profiles --------------------------------------------------------------------------------


def test_profiles_from_manifest(export_fsr64):
    manifest = read_manifest(export_fsr64)
    prefill, decode = graph_profiles(manifest, "decoder", MAX_BATCH, MAX_SEQ)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    for p in (prefill, decode):
        for k in range(3):  # min, opt, max: total = past + sequence
            emb, mask, past = (p.shapes[n][k] for n in ("inputs_embeds", "attention_mask", "past_key_values.0.key"))
            assert mask[1] == past[2] + emb[1]
            assert emb[2] == 64 and past[1] == 2 and past[3] == 16  # static dims from the manifest
    assert prefill.shapes["inputs_embeds"][2] == [MAX_BATCH, MAX_SEQ, 64]
    assert decode.shapes["past_key_values.1.value"][0][2] == 0  # an empty cache is allowed
    assert decode.contains({"inputs_embeds": (1, 1, 64)}) and not prefill.contains({"inputs_embeds": (1, 200, 64)})
    [vision] = graph_profiles(manifest, "vision", MAX_BATCH, MAX_SEQ)
    assert vision.shapes["pixel_values"] == ([1, 3, 336, 336], [1, 3, 336, 336], [2, 3, 336, 336])

    bad = Manifest.from_json(manifest.to_json())
    bad.graphs["embed"].inputs[0].shape[1] = "tokens"
    with pytest.raises(ProfileError, match="'tokens'"):
        graph_profiles(bad, "embed", MAX_BATCH, MAX_SEQ)
    with pytest.raises(ProfileError, match="--max-seq"):
        graph_profiles(manifest, "embed", 1, 1)


# -- builds ----------------------------------------------------------------------------------


def _copy(export, tmp_path_factory, name):
    dst = tmp_path_factory.mktemp("engines") / name
    shutil.copytree(export, dst)
    return dst


@pytest.fixture(scope="module")
def built_none(export_none, tmp_path_factory):
    from fsr.engines.builder import BuildSettings, build_engines

    _tensorrt()
    export = _copy(export_none, tmp_path_factory, "none")
    for precision in ("fp32", "fp16"):
        build_engines(export, BuildSettings(precision=precision, max_batch=MAX_BATCH, max_seq=MAX_SEQ))
    return export


@pytest.fixture(scope="module")
def built_fsr64(export_fsr64, tmp_path_factory):
    """fp32 through the Python API, fp16 through the ``fsr-build`` CLI."""
    from typer.testing import CliRunner

    from fsr.engines.builder import BuildSettings, build_engines
    from fsr.engines.cli import app

    trt = _tensorrt()
    export = _copy(export_fsr64, tmp_path_factory, "fsr64")
    build_engines(export, BuildSettings(precision="fp32", max_batch=MAX_BATCH, max_seq=MAX_SEQ))
    result = CliRunner().invoke(app, [str(export), "--precision", "fp16", "--max-batch", str(MAX_BATCH),
                                      "--max-seq", str(MAX_SEQ)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "engines/vision.fp16.engine" in result.output and trt.version in result.output
    return export


@pytest.fixture(scope="module")
def built_vz64(export_vz64, tmp_path_factory):
    """Every graph of the VisionZip export (the fsr.VisionZip function before the projector), fp32 and fp16."""
    from fsr.engines.builder import BuildSettings, build_engines

    _tensorrt()
    export = _copy(export_vz64, tmp_path_factory, "vz64")
    for precision in ("fp32", "fp16"):
        build_engines(export, BuildSettings(precision=precision, max_batch=MAX_BATCH, max_seq=MAX_SEQ))
    return export


@pytest.mark.parametrize("which", ["built_none", "built_fsr64", "built_vz64"])
def test_every_graph_has_engines_recorded_with_source_hashes(which, request):
    export = request.getfixturevalue(which)
    trt = _tensorrt()
    manifest = read_manifest(export, verify=True)  # building left the export's graphs intact
    precisions = ("fp32", "fp16")
    report = json.loads((export / "engines" / "build_report.json").read_text())
    for graph, g in manifest.graphs.items():
        for precision in precisions:
            name = f"{graph}.{precision}"
            entry = manifest.engines[name]
            engine = export / entry.file
            assert entry.file == f"engines/{graph}.{precision}.engine" and engine.stat().st_size > 10_000
            assert entry.size_bytes == engine.stat().st_size and entry.sha256 == sha256(engine)
            assert entry.source.file == g.file
            assert entry.source.files == {f.path: sha256(export / f.path) for f in g.files}  # + external data
            assert entry.tensorrt == {"flavour": trt.flavour, "version": trt.version}
            assert entry.profiles and not entry.plugin
            if precision == "fp16":
                assert entry.low_precision_nodes > 0
            row = report["engines"][name]
            assert row["precision"] == precision and row["size_bytes"] == entry.size_bytes
            assert row["build_seconds"] > 0 and row["flavour"] == trt.flavour and row["version"] == trt.version
            assert row["profiles"] == entry.profiles
            assert check_engine_fresh(manifest, export, graph, precision) == entry
    assert set(report["last_run"]) >= {"tensorrt", "timing_cache", "precision", "total_seconds"}
    if trt.has_timing_cache:
        assert (export / "engines" / "timing.cache").stat().st_size > 0
    else:
        assert "no-ops" in report["last_run"]["timing_cache"]


def test_plugin_graph_is_written_and_recorded(built_fsr64, built_none):
    manifest = read_manifest(built_fsr64)
    record = manifest.plugin_graphs["vision"]
    assert record.file == "vision.plugin.onnx" and record.nodes == 1
    assert record.files == {"vision.plugin.onnx": sha256(built_fsr64 / "vision.plugin.onnx")}
    assert record.source_files == {"vision.onnx": sha256(built_fsr64 / "vision.onnx")}
    assert record.plugin == {"name": "FocusScanRefine", "version": "1", "namespace": "fsr"}
    assert not read_manifest(built_none).plugin_graphs  # --method none: nothing to turn into a plugin


def test_visionzip_engines_and_no_plugin_form(built_vz64):
    from typer.testing import CliRunner

    from fsr.engines.cli import app

    manifest = read_manifest(built_vz64)
    assert set(manifest.engines) == {f"{g}.{p}" for g in ("vision", "embed", "decoder") for p in ("fp32", "fp16")}
    assert not manifest.plugin_graphs
    result = CliRunner().invoke(app, [str(built_vz64), "--plugin"], terminal_width=200)
    assert result.exit_code == 2  # VisionZip has no TensorRT plugin form (the function body builds as is)
    assert "has method 'visionzip'" in " ".join(result.output.split())


def test_plugin_build_refused_clearly_where_it_cannot_work(built_fsr64, built_none):
    from typer.testing import CliRunner

    from fsr.engines.cli import app

    trt = _tensorrt()
    result = CliRunner().invoke(app, [str(built_none), "--plugin"], terminal_width=200)
    assert result.exit_code == 2
    if trt.is_rtx:
        result = CliRunner().invoke(app, [str(built_fsr64), "--plugin"], terminal_width=200)
        assert result.exit_code == 2
        assert "needs full TensorRT" in result.output and "TensorRT-RTX" in result.output


def test_rebuild_replaces_the_entry(built_none):
    from fsr.engines.builder import BuildSettings, build_engines

    before = read_manifest(built_none).engines
    build_engines(built_none, BuildSettings(precision="fp32", max_batch=1, max_seq=MAX_SEQ, graphs=("embed",)))
    after = read_manifest(built_none).engines
    assert set(after) == set(before)
    assert after["embed.fp32"].max_batch == 1 and after["decoder.fp32"] == before["decoder.fp32"]


def test_changed_onnx_makes_the_engine_stale(built_none, tmp_path):
    export = tmp_path / "copy"
    shutil.copytree(built_none, export)
    manifest = read_manifest(export)
    model = onnx.load(export / "decoder.onnx")
    model.doc_string = "edited after the engines were built"
    onnx.save(model, export / "decoder.onnx")

    stale = r"decoder\.onnx changed since the engine was built; run fsr-build again"
    with pytest.raises(StaleEngineError, match=stale):
        check_engine_fresh(manifest, export, "decoder", "fp32")
    check_engine_fresh(manifest, export, "vision", "fp32")  # untouched graphs stay usable

    (export / "engines" / "embed.fp32.engine").unlink()
    with pytest.raises(StaleEngineError, match="missing; run fsr-build again"):
        check_engine_fresh(manifest, export, "embed", "fp32")
    with pytest.raises(ManifestError, match="run fsr-build first"):
        select_engine(manifest, "decoder", "bf16")


def test_a_changed_engine_file_is_refused(built_none, tmp_path):
    export = tmp_path / "copy"
    shutil.copytree(built_none, export)
    manifest = read_manifest(export)
    engine = export / manifest.engines["embed.fp32"].file
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(StaleEngineError, match=r"embed.fp32.engine refused: the file changed since fsr-build"):
        check_engine_fresh(manifest, export, "embed", "fp32")
    check_engine_fresh(manifest, export, "decoder", "fp32")


# -- PIO-FVLM: decoder segments and the pruning graphs between them ---------------------------------

PIO_MAX_SEQ = 700  # 576 image tokens + the prompt + generated tokens


@pytest.fixture(scope="module")
def built_pio(export_pio64, tmp_path_factory):
    from fsr.engines.builder import BuildSettings, build_engines

    _tensorrt()
    export = _copy(export_pio64, tmp_path_factory, "pio64")
    for precision in ("fp32", "fp16"):
        build_engines(export, BuildSettings(precision=precision, max_batch=MAX_BATCH, max_seq=PIO_MAX_SEQ))
    return export


def test_every_pio_graph_builds(built_pio):
    """Every graph of the PIO-FVLM export (vision, embed, four decoder segments, three pruning graphs whose
    NMS is a Loop in a local function and whose matrices are external data in the shared file) builds
    into a TensorRT(-RTX) engine, fp32 and fp16; the pruning graphs' profiles start at their image
    tokens + 2 (the graph's own minimum) and the segments' opt lengths follow their image tokens."""
    manifest = read_manifest(built_pio, verify=True)
    assert manifest.pruning_graphs == ["pruning_1", "pruning_10", "pruning_15"]
    for graph, entry in manifest.graphs.items():
        for precision in ("fp32", "fp16"):
            engine = manifest.engines[f"{graph}.{precision}"]
            assert (built_pio / engine.file).stat().st_size > 10_000
            assert engine.source.files == entry.hashes()  # the shared weights' files included
    tokens = {s.graph: s.image_tokens for s in manifest.decoder_segments}
    for segment in manifest.decoder_segments:
        prefill = manifest.engines[f"{segment.graph}.fp32"].profiles[0]
        assert prefill["dims"]["sequence"][1] == min(PIO_MAX_SEQ, tokens[segment.graph] + 64)
        if segment.prune_before:
            [profile] = manifest.engines[f"{segment.prune_before}.fp32"].profiles
            n = manifest.decoder_segments[manifest.decoder_segments.index(segment) - 1].image_tokens
            assert profile["dims"]["sequence"][0] == n + 2
            assert profile["shapes"]["image_start"]["max"] == [MAX_BATCH]
