"""FSR inside the exported graphs: end-to-end parity with the PyTorch reference pipeline,
and the op cut out of the exported vision graph against the readable reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from fsr.graph_passes import finalize, find_fsr_nodes, isolate_focus_scan_refine
from fsr.pruning import focus_scan_refine_reference
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline

MAX_NEW = 10


@pytest.fixture(scope="module")
def pipe(export_fsr64):
    with Pipeline(export_fsr64) as p:
        yield p


@pytest.fixture(scope="module")
def reference(export_fsr64):
    return ReferencePipeline.from_export(export_fsr64)


def test_manifest_records_the_method(export_fsr64, pipe):
    m = pipe.manifest
    assert (m.method.name, m.method.settings["budget"], m.image.kept_image_tokens, m.image.num_image_tokens) == (
        "fsr", 64, 64, 576)
    assert m.relevance.source == "clip" and "text_encoder" in m.graphs
    assert m.graphs["vision"].output_names == ["image_tokens", "kept_indices"]
    assert m.graphs["vision"].outputs[0].shape == ["batch", 64, 64]


@pytest.mark.parametrize("i", range(3))
def test_batch1_matches_reference_pipeline(pipe, reference, images, prompts, i):
    [got] = pipe.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    [want] = reference.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    assert got.kept_indices == want.kept_indices and len(got.kept_indices) == 64
    assert got.token_ids == want.token_ids


def test_batch2_matches_reference_pipeline(pipe, reference, images, prompts):
    got = pipe.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    want = reference.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_pruning_changes_what_the_llm_sees(export_fsr64, export_none, images, prompts):
    """Sanity: the pruned export differs from the unpruned one (the op is really in the graph)."""
    with Pipeline(export_none) as full:
        request = full.prepare([images[0]], [prompts[0]])
        unpruned = full.vision(request, full.instruction_embeds(request.instructions))
    with Pipeline(export_fsr64) as pruned:
        features = pruned.vision(request, pruned.instruction_embeds(request.instructions))
    [[tokens_full]], [[tokens]], [kept] = unpruned.embeddings, features.embeddings, features.kept_indices
    assert unpruned.kept_indices is None
    assert tokens_full.shape[0] == 576 and tokens.shape[0] == 64
    assert kept == sorted(set(kept))


@pytest.fixture(scope="module")
def isolated_fsr(export_fsr64):
    graph = gs.import_onnx(onnx.load(export_fsr64 / "vision.onnx"))
    [node] = find_fsr_nodes(graph)
    assert node.attrs["budget"] == 64
    assert [t.name for t in node.inputs] == ["tokens", "features", "saliency", "relevance"]
    model = finalize(isolate_focus_scan_refine(graph))
    assert [n.op_type for n in model.graph.node] == ["FocusScanRefine"]
    return ort.InferenceSession(model.SerializeToString()), node.attrs


def test_fsr_cut_out_of_export_matches_reference(isolated_fsr):
    """The function body exactly as exported, on random inputs of the export's shapes."""
    session, attrs = isolated_fsr
    g = torch.Generator().manual_seed(0)
    n_checked = 0
    for case in range(24):
        batch = 1 + case % 2
        tokens = torch.randn(batch, 576, 64, generator=g)
        features = torch.randn(batch, 576, 64, generator=g)
        if case % 3 == 0:  # duplicated features: ties in the distances
            features[:, 100:200] = features[:, :100]
        saliency = torch.rand(batch, 576, generator=g) ** (1 + 8 * (case % 4))  # peaky saliency
        if case % 5 == 0:
            saliency = torch.full((batch, 576), 0.25)  # constant: neutral term
        relevance = torch.rand(batch, 576, generator=g) * 2 - 1
        if case % 6 == 1:
            relevance = torch.round(relevance * 4) / 4  # quantised: ties in phi
        pruned, kept = session.run(None, {"tokens": tokens.numpy(), "features": features.numpy(),
                                          "saliency": saliency.numpy(), "relevance": relevance.numpy()})
        want, want_kept = focus_scan_refine_reference(
            tokens, features, saliency, relevance,
            **{k: attrs[k] for k in ("budget", "alpha", "beta", "rho", "kappa")})
        np.testing.assert_array_equal(kept, want_kept.numpy())
        np.testing.assert_allclose(pruned, want.numpy(), atol=1e-5, rtol=0)
        n_checked += batch
    assert n_checked == 36



def test_llm_embedding_relevance_fallback(tmp_path, export_none, images, prompts):
    """A checkpoint folder exported with the spec's fallback relevance (no CLIP text tower):
    the manifest records it, no text encoder is exported, and the exported pipeline still
    generates exactly what the PyTorch reference pipeline generates."""
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    out = tmp_path / "fallback"
    export_model(load_model(str(export_none / "source")), out, ExportSettings("fsr", budget=32, relevance="llm"))
    with Pipeline(out) as pipe:
        m = pipe.manifest
        assert m.relevance.source == "llm-embedding-mean" and "text_encoder" not in m.graphs
        assert m.model.path == str(export_none / "source")
        got = pipe.generate(images[:2], prompts[:2], max_new_tokens=6)
    want = ReferencePipeline.from_export(out).generate(images[:2], prompts[:2], max_new_tokens=6)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert all(len(g.kept_indices) == 32 for g in got)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
