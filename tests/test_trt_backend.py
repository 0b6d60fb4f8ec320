"""The TensorRT backend: clear refusal without a GPU (tested everywhere), runs where a GPU is.

Tests marked by `_needs_gpu_and_tensorrt` build engines for a copy of the tiny FSR export
and compare the TensorRT pipeline with ONNX Runtime; they skip on machines without an
NVIDIA GPU or without TensorRT (CI here has neither a GPU nor full TensorRT).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from fsr.manifest import read_manifest
from fsr.runtime.backend import BackendError, get_backend

MAX_BATCH, MAX_SEQ = 2, 256


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _tensorrt():
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    try:
        return import_tensorrt()
    except TensorRTMissing as exc:
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")


def _needs_gpu_and_tensorrt():
    if not _has_gpu():
        pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False on this machine)")
    return _tensorrt()


def _build(export, tmp_path_factory, name, **settings):
    from fsr.engines.builder import BuildSettings, build_engines

    dst = tmp_path_factory.mktemp("trt") / name
    shutil.copytree(export, dst)
    for precision in settings.pop("precisions", ("fp32",)):
        build_engines(dst, BuildSettings(precision=precision, **settings))
    return dst


# -- everywhere ------------------------------------------------------------------------------


@pytest.mark.skipif("_has_gpu()", reason="this machine has a GPU; the no-GPU message cannot be shown")
def test_fsr_run_with_trt_backend_exits_nonzero_without_gpu(export_none, images):
    import typer
    from typer.testing import CliRunner

    from fsr.runtime.cli import run

    app = typer.Typer()
    app.command()(run)
    result = CliRunner().invoke(app, [str(export_none), "--image", str(images[0]), "--prompt", "What is this?",
                                      "--backend", "trt"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "needs an NVIDIA GPU" in result.output and "--backend ort" in result.output


@pytest.mark.skipif("_has_gpu()", reason="this machine has a GPU")
def test_backend_refuses_without_gpu(export_none):
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        get_backend("trt", export_none, read_manifest(export_none))


def test_backend_refuses_stale_engine_before_touching_the_gpu(export_none, tmp_path_factory, monkeypatch):
    """With the GPU check passed (patched here), choosing an engine whose ONNX changed fails with
    the rebuild message; choosing a fresh one yields an inactive runner (activation needs the GPU)."""
    import fsr.runtime.trt as trt_backend

    _tensorrt()
    export = _build(export_none, tmp_path_factory, "stale", max_batch=1, max_seq=MAX_SEQ, graphs=("embed", "decoder"))
    monkeypatch.setattr(trt_backend, "require_gpu", lambda: None)
    backend = get_backend("trt", export, read_manifest(export))
    runner = backend.runner("decoder")
    assert not runner.is_active and runner.input_names[0] == "inputs_embeds"
    assert runner.output_names[1:] == [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    with pytest.raises(BackendError, match="no TensorRT engine for graph 'vision'.*fsr-build"):
        backend.runner("vision")

    model = onnx.load(export / "decoder.onnx")
    model.doc_string = "changed"
    onnx.save(model, export / "decoder.onnx")
    with pytest.raises(BackendError, match=r"decoder\.onnx changed since the engine was built; run fsr-build again"):
        backend.runner("decoder")
    backend.runner("embed")


def test_runner_picks_the_profile_that_fits(export_fsr64):
    from fsr.engines.profiles import graph_profiles
    from fsr.runtime.trt import TensorRTRunner

    manifest = read_manifest(export_fsr64)
    profiles = graph_profiles(manifest, "decoder", MAX_BATCH, MAX_SEQ)
    runner = TensorRTRunner("decoder", export_fsr64 / "none.engine", {"profiles": []}, trt=None,
                            inputs=[], outputs=[])
    runner.profiles = profiles

    def shapes(batch, seq, past):
        out = {"inputs_embeds": (batch, seq, 64), "attention_mask": (batch, past + seq), "position_ids": (batch, seq)}
        out.update({f"past_key_values.{i}.{k}": (batch, 2, past, 16) for i in range(2) for k in ("key", "value")})
        return out

    assert profiles[runner._profile_for(shapes(2, 90, 0))].name == "prefill"
    assert profiles[runner._profile_for(shapes(1, 1, 90))].name == "decode"
    with pytest.raises(BackendError, match="--max-seq"):
        runner._profile_for(shapes(1, 1, MAX_SEQ))
    with pytest.raises(BackendError, match="--max-batch"):
        runner._profile_for(shapes(3, 5, 0))


# -- where a GPU and TensorRT exist ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_export(export_fsr64, tmp_path_factory):
    _needs_gpu_and_tensorrt()
    return _build(export_fsr64, tmp_path_factory, "gpu", precisions=("fp32", "fp16"),
                  max_batch=MAX_BATCH, max_seq=MAX_SEQ)


def test_trt_pipeline_matches_onnxruntime(gpu_export, images, prompts):
    from fsr.runtime.pipeline import Pipeline

    with Pipeline(gpu_export, backend="ort") as ort_pipe:
        expected = ort_pipe.generate(images[:2], prompts[:2], max_new_tokens=8)
    with Pipeline(gpu_export, backend="trt", precision="fp32") as trt_pipe:
        got = trt_pipe.generate(images[:2], prompts[:2], max_new_tokens=8)
    for e, g in zip(expected, got):
        assert g.kept_indices == e.kept_indices
        assert g.token_ids == e.token_ids


def test_kv_cache_stays_on_the_device(gpu_export):
    import torch

    from fsr.runtime.pipeline import Pipeline

    with Pipeline(gpu_export, backend="trt", precision="fp32") as pipe:
        batch, seq = 1, 5
        embeds = np.random.RandomState(0).randn(batch, seq, 64).astype(np.float32)
        mask = np.ones((batch, seq), np.int64)
        positions = np.arange(seq)[None].astype(np.int64)
        logits, presents = pipe.decoder(embeds, mask, positions, pipe.empty_cache(batch))
        assert isinstance(logits, torch.Tensor) and logits.is_cuda
        assert all(isinstance(p, torch.Tensor) and p.is_cuda and p.shape[2] == seq for p in presents[0])
        step = pipe.decoder(embeds[:, :1], np.ones((batch, seq + 1), np.int64), np.array([[seq]]), presents)
        assert step[1][0][0].shape[2] == seq + 1 and step[1][0][0].is_cuda


def test_fp16_engines_close_to_fp32(gpu_export, images, prompts):
    from fsr.runtime.pipeline import Pipeline

    outs = {}
    for precision in ("fp32", "fp16"):
        with Pipeline(gpu_export, backend="trt", precision=precision) as pipe:
            pixels, rows, instructions = pipe.prepare(images[:1], prompts[:1])
            tokens, kept = pipe.vision(pixels, pipe.instruction_embeds(instructions))
            outs[precision] = tokens, kept
    (t32, k32), (t16, k16) = outs["fp32"], outs["fp16"]
    assert (k16 == k32).mean() > 0.9
    same = k16 == k32
    np.testing.assert_allclose(t16[same], t32[same], atol=1e-2)


def test_cuda_graph_decode_gives_the_same_tokens(gpu_export, images, prompts):
    from fsr.runtime.pipeline import Pipeline

    with Pipeline(gpu_export, backend="trt", precision="fp32") as pipe:
        plain = pipe.generate(images[:1], prompts[:1], max_new_tokens=6)
    with Pipeline(gpu_export, backend="trt", precision="fp32", cuda_graphs=True) as pipe:
        first = pipe.generate(images[:1], prompts[:1], max_new_tokens=6)
        again = pipe.generate(images[:1], prompts[:1], max_new_tokens=6)  # replays captured steps
    assert first[0].token_ids == plain[0].token_ids == again[0].token_ids


def test_plugin_engine_matches_function_body_engine(gpu_export, images, prompts, tmp_path_factory):
    """Full TensorRT with libfsr_plugin.so built: the plugin vision engine keeps the same tokens."""
    from fsr.engines.plugin_graph import PluginError, find_plugin_library
    from fsr.runtime.pipeline import Pipeline

    trt = _needs_gpu_and_tensorrt()
    if not trt.has_plugin_support:
        pytest.skip(f"the plugin needs full TensorRT; {trt.label} is installed")
    try:
        find_plugin_library()
    except PluginError as exc:
        pytest.skip(str(exc))
    export = _build(gpu_export, tmp_path_factory, "plugin", max_batch=MAX_BATCH, max_seq=MAX_SEQ,
                    graphs=("vision",), plugin=True)
    assert read_manifest(export)["engines"]["vision.plugin.fp32"]["source"]["file"] == "vision.plugin.onnx"
    outs = {}
    for plugin in (False, True):
        with Pipeline(export, backend="trt", precision="fp32", plugin=plugin) as pipe:
            pixels, rows, instructions = pipe.prepare(images[:2], prompts[:2])
            outs[plugin] = pipe.vision(pixels, pipe.instruction_embeds(instructions))
    np.testing.assert_array_equal(outs[True][1], outs[False][1])
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=1e-4)


@pytest.fixture(scope="module")
def gpu_pio_export(export_pio64, tmp_path_factory):
    _needs_gpu_and_tensorrt()
    return _build(export_pio64, tmp_path_factory, "gpu-pio", precisions=("fp32",), max_batch=MAX_BATCH, max_seq=700)


def test_trt_pio_pipeline_matches_onnxruntime(gpu_pio_export, images, prompts):
    """PIO-FVLM on TensorRT: the pruning engines between the decoder-segment engines, device arrays
    throughout; the same kept indices per stage and tokens as ONNX Runtime, batch 2 (left padding)."""
    from fsr.runtime.pipeline import Pipeline

    with Pipeline(gpu_pio_export, backend="ort") as ort_pipe:
        expected = ort_pipe.generate(images[:2], prompts[:2], max_new_tokens=8)
    with Pipeline(gpu_pio_export, backend="trt", precision="fp32") as trt_pipe:
        got = trt_pipe.generate(images[:2], prompts[:2], max_new_tokens=8)
    for e, g in zip(expected, got):
        assert g.kept_indices == e.kept_indices
        assert g.token_ids == e.token_ids
