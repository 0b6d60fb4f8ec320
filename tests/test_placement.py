"""A method placed before the projector (as VisionZip is): the spec traces the tower without the
projector, the method's op goes in, the projector is traced after it; the PyTorch forms, the
runtime and the fidelity report put the projector after the method too.

The method here is a test method registered for this module only: it keeps the first
``budget`` patch features (one ONNX Slice)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from fsr.pruning import methods as registry
from fsr.pruning.methods import BEFORE_PROJECTOR, BudgetSettings, PruningMethod


class FirstFeatures(torch.nn.Module):
    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def forward(self, features):
        k = min(self.budget, features.shape[1])
        kept = torch.arange(k, device=features.device).unsqueeze(0).expand(features.shape[0], k)
        return features[:, :k], kept


class KeepFirst(PruningMethod):
    name = "test-keep-first"
    summary = "the first K patch features, before the projector (a test method)"
    Settings = BudgetSettings
    needs = ("features",)
    placement = BEFORE_PROJECTOR
    exportable = True

    def reference(self, settings):
        module = FirstFeatures(settings.budget)
        return lambda inputs: module(inputs["features"])

    def torch_module(self, settings, *, relevance):
        return FirstFeatures(settings.budget)

    def attach(self, graph, settings, *, relevance):
        features = next(t for t in graph.outputs if t.name == "features")
        k = settings.budget
        pruned = gs.Variable("image_tokens", dtype=features.dtype)
        graph.nodes.append(gs.Node("Slice", inputs=[features, gs.Constant("k_start", np.array([0])),
                                                    gs.Constant("k_end", np.array([k])),
                                                    gs.Constant("k_axis", np.array([1]))], outputs=[pruned]))
        shape, batch, size = (gs.Variable(n, dtype=np.int64) for n in ("f_shape", "f_batch", "kept_shape"))
        graph.nodes.append(gs.Node("Shape", inputs=[features], outputs=[shape]))
        graph.nodes.append(gs.Node("Slice", inputs=[shape, gs.Constant("b_start", np.array([0])),
                                                    gs.Constant("b_end", np.array([1]))], outputs=[batch]))
        graph.nodes.append(gs.Node("Concat", inputs=[batch, gs.Constant("k_len", np.array([k]))], outputs=[size],
                                   attrs={"axis": 0}))
        kept = gs.Variable("kept_indices", dtype=np.int64)
        graph.nodes.append(gs.Node("Expand", inputs=[gs.Constant("k_range", np.arange(k)[None]), size],
                                   outputs=[kept]))
        graph.outputs = [pruned, kept]
        graph.cleanup(remove_unused_graph_inputs=True)
        return graph


@pytest.fixture(scope="module")
def keep_first():
    method = KeepFirst()
    registry._METHODS[method.name] = method
    yield method
    del registry._METHODS[method.name]


@pytest.fixture(scope="module")
def export_first(keep_first, tmp_path_factory):
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    out = tmp_path_factory.mktemp("exports") / "first16"
    export_model(load_model("tiny"), out, ExportSettings(keep_first.name, budget=16))
    return out


def test_the_projector_follows_the_op_in_the_exported_graph(export_first, tiny_model):
    import onnx
    import onnxruntime as ort

    from fsr.manifest import read_manifest
    from fsr.models import get_spec

    manifest = read_manifest(export_first, verify=True)
    vision = manifest.graphs["vision"]
    assert vision.input_names == ["pixel_values"] and vision.output_names == ["image_tokens", "kept_indices"]
    assert vision.outputs[0].shape[1:] == [16, manifest.llm.hidden_size]
    assert manifest.image.kept_image_tokens == 16
    onnx.checker.check_model(str(export_first / "vision.onnx"), full_check=True)

    spec = get_spec("llava")
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = spec.vision_tower(tiny_model, ("features",), None)(pixels)
        expected = spec.projector(tiny_model)(features[:, :16])
        torch_form = spec.vision_graph(tiny_model, manifest, "torch").module(pixels)
    session = ort.InferenceSession(str(export_first / "vision.onnx"), providers=["CPUExecutionProvider"])
    tokens, kept = session.run(None, {"pixel_values": pixels.numpy()})
    np.testing.assert_allclose(tokens, expected.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(kept, np.tile(np.arange(16), (2, 1)))
    torch.testing.assert_close(torch_form[0], expected)


def test_the_pipeline_generates_what_the_reference_generates(export_first, images, prompts):
    from fsr.runtime.pipeline import Pipeline
    from fsr.runtime.reference import ReferencePipeline

    with Pipeline(export_first) as pipe:
        got = pipe.generate(images[:2], prompts[:2], max_new_tokens=5)
    want = ReferencePipeline.from_export(export_first).generate(images[:2], prompts[:2], max_new_tokens=5)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].kept_indices == list(range(16))


def test_fidelity_puts_the_projector_after_the_method(export_first, keep_first):
    from fsr.compare.fidelity import pruning_fidelity
    from fsr.compare.samples import make_samples
    from fsr.runtime.reference import ReferencePipeline

    pipe = ReferencePipeline.from_export(export_first)
    report = pruning_fidelity(pipe, pipe.manifest, make_samples(builtin=1), budgets=(576, 16),
                              methods=[keep_first.name], max_new_tokens=3)
    rows = {r["budget"]: r for r in report["rows"]}
    assert rows[576]["kl_max"] == 0.0 and rows[576]["kept_tokens"] == 576  # all features, projected: the identity
    assert rows[16]["kept_tokens"] == 16 and rows[16]["kl_mean"] > 0
    assert dataclasses.is_dataclass(pipe.manifest)
