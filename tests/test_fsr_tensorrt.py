"""TensorRT(-RTX) builds the FocusScanRefine function body with a dynamic token count.

The one-node model is made from the function in an exported ``vision.onnx`` (the body every
model carries), with an optimisation profile N in [64, 2,880]. TensorRT-RTX builds ahead of
time on this CPU-only machine (it cannot run the engine without a GPU); CI installs it and
must prove the builds, so there a missing TensorRT fails instead of skipping.
"""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import helper

from fsr.pruning.fsr_identity import FSR_DOMAIN, FSR_OP
from fsr.pruning.onnx_function import make_fsr_model

D, F = 64, 48
N_MIN, N_OPT, N_MAX = 64, 576, 2880


def _tensorrt():
    from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

    try:
        return import_tensorrt()
    except TensorRTMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs tensorrt-rtx (the test extra) and must build engines: {exc}")
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")


@pytest.fixture(scope="module")
def exported_function(export_fsr64):
    model = onnx.load(export_fsr64 / "vision.onnx")
    [fn] = [f for f in model.functions if (f.domain, f.name) == (FSR_DOMAIN, FSR_OP)]
    return fn, [helper.make_opsetid("", 18), helper.make_opsetid(FSR_DOMAIN, 1)]


def _build(trt, model: onnx.ModelProto, batch_max: int = 2):
    from fsr.engines.trt_import import make_logger

    module = trt.module
    logger = make_logger(trt)
    builder = module.Builder(logger)
    network = builder.create_network(1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = module.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        pytest.fail(f"TensorRT's ONNX parser rejected the FocusScanRefine body: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        width = {"tokens": D, "features": F}.get(tensor.name)
        shapes = [(1, n) + ((width,) if width else ()) for n in (N_MIN, N_OPT)] + \
            [(batch_max, N_MAX) + ((width,) if width else ())]
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None, f"TensorRT build failed: {logger.errors()}"
    assert engine.nbytes > 0
    return network


@pytest.mark.parametrize("settings", [
    dict(budget=64),
    dict(budget=320, alpha=2.5, beta=0.5, rho=0.75, kappa=2.0, dtype="float16"),
    dict(budget=1, keep_ratio=0.25),
])
def test_tensorrt_builds_the_body_for_n_64_to_2880(exported_function, settings):
    trt = _tensorrt()
    model = make_fsr_model(**settings, token_dim=D, feature_dim=F, function=exported_function)
    network = _build(trt, model)
    names = [network.get_output(i).name for i in range(network.num_outputs)]
    assert names == ["pruned", "kept_indices"]
    assert list(network.get_output(0).shape)[1] == -1  # K follows N at run time
