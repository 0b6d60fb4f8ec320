"""ctypes access to the FocusScanRefine kernels without TensorRT (shared by the tests and
``bench_kernel.py``).

``build_kernel_library`` builds ``libfsr_kernels_test.so`` (the C ABI of
``focusScanRefineHostTest.cu``) with CMake and nvcc; ``KernelLibrary`` calls it with NumPy or
torch (CPU) arrays and returns NumPy arrays.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

PLUGIN_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libfsr_kernels_test.so"
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


# --- building ----------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None
    )


def build_kernel_library(build_dir: Path, cuda_arch: str = "90") -> Path:
    """Configure and build the kernel test library for one CUDA architecture; returns its path."""
    nvcc, cmake = find_nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        raise FileNotFoundError(f"need nvcc and cmake (nvcc={nvcc}, cmake={cmake})")
    configure = [cmake, "-S", str(PLUGIN_DIR), "-B", str(build_dir), f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_BUILD_TYPE=Release"]
    build = [cmake, "--build", str(build_dir), "--target", "fsr_kernels_test", "-j", str(os.cpu_count() or 2)]
    for command in (configure, build):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    library = build_dir / LIBRARY_NAME
    if not library.exists():
        raise RuntimeError(f"build finished but {library} is missing")
    return library


def gpu_arch() -> str | None:
    """Compute capability of CUDA device 0 as CMake wants it ("90"), or None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


# --- ctypes wrapper ------------------------------------------------------------------------------


def as_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class KernelLibrary:
    """The C ABI of ``plugin/focusScanRefineHostTest.cu`` (host buffers in, host buffers out)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        c_int, c_float, c_void = ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
        self.lib.fsr_cuda_device_count.restype = c_int
        self.lib.fsr_error_string.restype = ctypes.c_char_p
        self.lib.fsr_error_string.argtypes = [c_int]
        self.lib.fsr_workspace_size.restype = ctypes.c_uint64
        self.lib.fsr_workspace_size.argtypes = [c_int] * 4
        self.lib.fsr_max_tokens.restype = c_int
        self.lib.fsr_kept_count.restype = c_int
        self.lib.fsr_kept_count.argtypes = [c_int, c_float, c_int]
        self.lib.fsr_run_host.restype = c_int
        self.lib.fsr_run_host.argtypes = [c_void, c_int, c_void, c_int, c_void, c_void, c_int, c_void, c_void,
                                          c_int, c_int, c_int, c_int, c_int, c_float, c_float, c_float, c_float,
                                          c_float]
        self.lib.fsr_bench_host.restype = c_int
        self.lib.fsr_bench_host.argtypes = [c_void, c_int, c_void, c_int, c_void, c_void, c_int,
                                            c_int, c_int, c_int, c_int, c_int, c_float, c_float, c_float, c_float,
                                            c_float, c_int, c_int, c_void]

    def device_count(self) -> int:
        return self.lib.fsr_cuda_device_count()

    def workspace_size(self, batch: int, num_tokens: int, feature_dim: int, keep: int) -> int:
        """Workspace bytes for N tokens of which ``keep`` (K) are kept (0 when K >= N)."""
        return self.lib.fsr_workspace_size(batch, num_tokens, feature_dim, keep)

    def kept_count(self, budget: int, keep_ratio: float, num_tokens: int) -> int:
        """K as the kernels and the plugin compute it (host code: no GPU needed)."""
        return self.lib.fsr_kept_count(budget, keep_ratio, num_tokens)

    def max_tokens(self) -> int:
        return self.lib.fsr_max_tokens()

    @staticmethod
    def _inputs(tokens, features, saliency, relevance):
        tokens, features = as_numpy(tokens), as_numpy(features)
        saliency, relevance = as_numpy(saliency), as_numpy(relevance)
        batched = tokens.ndim == 3
        if not batched:  # one row: [N, D]
            tokens, features, saliency = tokens[None], features[None], saliency[None]
            relevance = None if relevance is None else relevance[None]
        scores_dtype = saliency.dtype if relevance is None or relevance.dtype == saliency.dtype else np.float32
        arrays = {
            "tokens": np.ascontiguousarray(tokens),
            "features": np.ascontiguousarray(features),
            "saliency": np.ascontiguousarray(saliency, dtype=scores_dtype),
            "relevance": None if relevance is None else np.ascontiguousarray(relevance, dtype=scores_dtype),
        }
        for name, array in arrays.items():
            if array is not None and array.dtype not in DTYPE_CODES:
                raise TypeError(f"{name}: dtype {array.dtype} is not float32/float16")
        return arrays, batched

    def run(self, tokens, features, saliency, relevance=None, *, budget, alpha=3.0, beta=1.0, rho=0.9, kappa=1.0,
            keep_ratio=0.0):
        """Returns (pruned, kept_indices) as NumPy arrays, shaped like the reference's outputs."""
        a, batched = self._inputs(tokens, features, saliency, relevance)
        b, n, d = a["tokens"].shape
        f = a["features"].shape[2]
        k = self.kept_count(budget, keep_ratio, n) if n > 0 else 0
        pruned = np.empty((b, k, d), dtype=a["tokens"].dtype)
        kept = np.empty((b, k), dtype=np.int64)
        rel = a["relevance"]
        code = self.lib.fsr_run_host(
            a["tokens"].ctypes.data, DTYPE_CODES[a["tokens"].dtype], a["features"].ctypes.data,
            DTYPE_CODES[a["features"].dtype], a["saliency"].ctypes.data, None if rel is None else rel.ctypes.data,
            DTYPE_CODES[a["saliency"].dtype], pruned.ctypes.data, kept.ctypes.data,
            b, n, d, f, budget, alpha, beta, rho, kappa, keep_ratio)
        if code != 0:
            raise RuntimeError(f"fsr_run_host failed: {code} ({self.lib.fsr_error_string(code).decode()})")
        return (pruned, kept) if batched else (pruned[0], kept[0])

    def bench(self, tokens, features, saliency, relevance=None, *, budget, alpha=3.0, beta=1.0, rho=0.9,
              kappa=1.0, keep_ratio=0.0, warmup=10, iterations=50) -> np.ndarray:
        """Per-launch GPU times in ms (CUDA events), inputs already on the device."""
        a, _ = self._inputs(tokens, features, saliency, relevance)
        b, n, d = a["tokens"].shape
        times = np.zeros(iterations, dtype=np.float32)
        rel = a["relevance"]
        code = self.lib.fsr_bench_host(
            a["tokens"].ctypes.data, DTYPE_CODES[a["tokens"].dtype], a["features"].ctypes.data,
            DTYPE_CODES[a["features"].dtype], a["saliency"].ctypes.data, None if rel is None else rel.ctypes.data,
            DTYPE_CODES[a["saliency"].dtype], b, n, d, a["features"].shape[2], budget, alpha, beta, rho, kappa,
            keep_ratio, warmup, iterations, times.ctypes.data)
        if code != 0:
            raise RuntimeError(f"fsr_bench_host failed: {code} ({self.lib.fsr_error_string(code).decode()})")
        return times
