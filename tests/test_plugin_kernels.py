"""Tests of the FocusScanRefine TensorRT plugin's CUDA kernels (``plugin/``), without TensorRT.

* ``test_kernels_compile`` builds ``fsr_kernels`` and ``libfsr_kernels_test.so`` with CMake and nvcc
  (one GPU architecture, to keep it quick) and checks the C ABI loads. Runs wherever nvcc and
  cmake exist, GPU or not.
* ``test_kernel_matches_reference`` runs the kernels through that C ABI (ctypes, host NumPy
  buffers) on many random cases and compares them with the PyTorch reference
  ``fsr.pruning.focus_scan_refine_reference``: identical kept indices, pruned tokens within 1e-5
  (fp32 tokens) or one fp16 step (fp16 tokens). Needs a CUDA GPU; skipped otherwise.
* ``test_kernel_tie_breaks_and_identity``: hand-made exact ties, budget >= N, fp16; same checks.

The ctypes wrapper and the CMake build live in ``plugin/kernel_library.py`` (also used by
``plugin/bench_kernel.py``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugin"
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 2e-3  # about one fp16 step for |x| ~ 1 (pruning/README.md, convention 9)


def _load_kernel_library_module():
    """plugin/kernel_library.py (plugin/ is not a Python package)."""
    spec = importlib.util.spec_from_file_location("fsr_plugin_kernel_library", PLUGIN_DIR / "kernel_library.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kl = _load_kernel_library_module()
KernelLibrary = kl.KernelLibrary
as_numpy = kl.as_numpy


# --- comparison --------------------------------------------------------------------------------

def _attribute_defaults():
    from fsr.pruning.fsr_identity import FSR_ATTRIBUTE_DEFAULTS  # the op's identity file

    return FSR_ATTRIBUTE_DEFAULTS


def compare_with_reference(library: KernelLibrary, case: dict, reference) -> None:
    """Run one case through the kernels and `reference`; assert identical indices, close values."""
    attrs = {"budget": int(case["budget"])}
    attrs.update({name: float(case.get(name, default)) for name, default in _attribute_defaults().items()})
    want_pruned, want_kept = reference(case["tokens"], case["features"], case["saliency"], case.get("relevance"),
                                       **attrs)
    got_pruned, got_kept = library.run(case["tokens"], case["features"], case["saliency"], case.get("relevance"),
                                       **attrs)
    want_pruned, want_kept = as_numpy(want_pruned), as_numpy(want_kept)
    np.testing.assert_array_equal(got_kept, want_kept.astype(np.int64), err_msg=f"kept indices differ ({attrs})")
    assert got_pruned.dtype == want_pruned.dtype, (got_pruned.dtype, want_pruned.dtype)
    tol = FP16_TOLERANCE if got_pruned.dtype == np.float16 else FP32_TOLERANCE
    np.testing.assert_allclose(got_pruned.astype(np.float32), want_pruned.astype(np.float32), rtol=tol, atol=tol,
                               err_msg=f"pruned tokens differ ({attrs})")


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory) -> KernelLibrary:
    if kl.find_nvcc() is None or shutil.which("cmake") is None:
        pytest.skip("nvcc and cmake are needed to build plugin/ (CUDA toolkit not installed)")
    arch = kl.gpu_arch() or "90"  # the GPU's own architecture when there is one, else Hopper
    path = kl.build_kernel_library(tmp_path_factory.mktemp("fsr_plugin_build"), arch)
    return KernelLibrary(path)


def test_kernels_compile(kernel_library: KernelLibrary):
    """The kernels and their C ABI build with nvcc and load; host-side helpers answer."""
    assert kernel_library.path.exists()
    assert kernel_library.max_tokens() >= 4096
    assert kernel_library.workspace_size(2, 576, 1024, 576) == 0  # K = N: identity, no workspace
    small = kernel_library.workspace_size(1, 576, 1024, 64)
    assert small >= 4 * 576 * 576  # the fp32 Gram matrix
    assert kernel_library.workspace_size(2, 576, 1024, 64) >= 2 * small - 4096
    assert kernel_library.workspace_size(1, 1024, 1024, 64) > small


def test_kept_count_matches_the_op(kernel_library: KernelLibrary):
    """K from budget / keep_ratio as the kernels and the plugin compute it (host code, runs
    without a GPU) equals fsr.pruning.kept_count, for float32 ratios that are not exact
    binary fractions too."""
    import random

    from fsr.pruning.fsr_identity import float32, kept_count

    rng = random.Random(1)
    ratios = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0, 2.0**-20, 2.0**-30] + [rng.random() for _ in range(300)]
    for ratio in ratios:
        for n in (1, 2, 3, 7, 100, 576, 1000, 2880, 8192, rng.randrange(1, 2**20)):
            for budget in (1, 64, 3840):
                assert kernel_library.kept_count(budget, float32(ratio), n) == kept_count(n, budget, ratio), \
                    (budget, ratio, n)


def _require_gpu(library: KernelLibrary) -> None:
    if kl.gpu_arch() is None and library.device_count() <= 0:
        pytest.skip("no CUDA GPU on this machine: the kernels were built but cannot run here")


def test_kernel_matches_reference(kernel_library: KernelLibrary):
    """Kernels == PyTorch reference on many random cases (indices exact, values within tolerance)."""
    _require_gpu(kernel_library)
    try:
        from fsr.pruning import focus_scan_refine_reference
        from fsr.pruning.testing import random_fsr_cases
    except ImportError as error:
        pytest.skip(f"PyTorch reference not importable: {error}")
    count = 0
    for case in random_fsr_cases(200, 0):
        compare_with_reference(kernel_library, case, focus_scan_refine_reference)
        count += 1
    assert count > 0


def test_kernel_tie_breaks_and_identity(kernel_library: KernelLibrary):
    """Hand-made cases with exact ties (flat saliency, duplicated features), budget >= N, fp16."""
    _require_gpu(kernel_library)
    try:
        from fsr.pruning import focus_scan_refine_reference
    except ImportError as error:
        pytest.skip(f"PyTorch reference not importable: {error}")
    rng = np.random.default_rng(7)
    n, d, f = 40, 24, 16
    tokens = rng.standard_normal((2, n, d)).astype(np.float32)
    features = rng.standard_normal((2, n, f)).astype(np.float32)
    features[:, 10:20] = features[:, 0:1]  # many identical feature rows: exact cosine ties
    features[:, 25] = 0.0  # a zero feature vector
    saliency = rng.random((2, n)).astype(np.float32)
    relevance = rng.random((2, n)).astype(np.float32)
    flat = np.full((2, n), 0.25, dtype=np.float32)  # max == min: norm01 = 1, phi ties everywhere
    sparse = saliency.copy()
    sparse[:, 8:] = 0.0  # phi = 0 for 32 tokens: with rho = 1 the cumsum hits rho * sum exactly at 8
    import torch

    cases = [
        dict(saliency=saliency, relevance=relevance, budget=12),
        dict(saliency=saliency, relevance=relevance, budget=1, keep_ratio=0.3),
        dict(saliency=flat, relevance=None, budget=1, keep_ratio=1.0),  # identity
        dict(saliency=flat, relevance=None, budget=12),
        dict(saliency=saliency, relevance=flat, budget=30, kappa=0.5),
        dict(saliency=saliency, relevance=None, budget=n),  # identity
        dict(saliency=saliency, relevance=None, budget=n + 5),  # identity
        dict(saliency=saliency, relevance=relevance, budget=1),
        dict(saliency=saliency, relevance=relevance, budget=20, rho=0.0),
        dict(saliency=saliency, relevance=relevance, budget=20, rho=1.0, alpha=2.0, beta=0.5),
        dict(saliency=sparse, relevance=None, budget=30, rho=1.0),  # K_F = 8, not K
        dict(saliency=sparse, relevance=None, budget=30, rho=1.0, kappa=3.0),
    ]
    for extra in cases:
        for token_dtype in (np.float32, np.float16):
            case = dict(extra)
            case["tokens"] = torch.from_numpy(tokens.astype(token_dtype))
            case["features"] = torch.from_numpy(features)
            case["saliency"] = torch.from_numpy(case["saliency"])
            case["relevance"] = None if case["relevance"] is None else torch.from_numpy(case["relevance"])
            compare_with_reference(kernel_library, case, focus_scan_refine_reference)


@pytest.mark.parametrize("n, budget, keep_ratio", [(576, 64, 0.0), (2880, 320, 0.0), (2880, 1, 0.25),
                                                   (4200, 3840, 0.0), (8192, 640, 0.0), (8192, 1, 0.47)])
def test_kernel_large_n_and_budget(kernel_library: KernelLibrary, n, budget, keep_ratio):
    """N up to 8,192 (2, 4 and 8 tokens per thread), budgets up to 3,840, keep_ratio: against the reference."""
    _require_gpu(kernel_library)
    import torch

    from fsr.pruning.testing import make_fsr_inputs

    g = torch.Generator().manual_seed(n + budget)
    for pattern in ("peaky", "clustered"):
        case = make_fsr_inputs(pattern, batch=1, num_tokens=n, token_dim=16, feature_dim=24, generator=g)
        case.update(budget=budget, keep_ratio=keep_ratio)
        from fsr.pruning import focus_scan_refine_reference

        compare_with_reference(kernel_library, case, focus_scan_refine_reference)
