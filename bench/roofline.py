"""The device's limits, measured once per run, and the roofline time of a piece of work.

``ideal time = max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``: a stage is
compute-bound when the first term wins, memory-bound (weight reading, for a decoder at
small batch) when the second does. The peaks are *measured* on the machine the run is
on, not taken from a data sheet: the best of a few large matrix products (FLOP/s) and
of a few large array copies (bytes read + written per second).
"""

from __future__ import annotations

import dataclasses
import platform
import time

import numpy as np
import torch


@dataclasses.dataclass
class DevicePeak:
    device: str  # "cpu" or "cuda"
    name: str  # CPU model / GPU name
    dtype: str  # dtype of the matrix products
    peak_flops: float  # FLOP/s
    peak_bandwidth: float  # bytes/s
    matmul_n: int
    copy_bytes: int
    method: str

    samples: list = dataclasses.field(default_factory=list)  # [(flops, bandwidth)] of each measurement

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def best_with(self, other: "DevicePeak") -> "DevicePeak":
        """The higher of two measurements of each peak (load from other processes only ever lowers them)."""
        samples = (self.samples or [(self.peak_flops, self.peak_bandwidth)]) + \
            (other.samples or [(other.peak_flops, other.peak_bandwidth)])
        return dataclasses.replace(self, peak_flops=max(self.peak_flops, other.peak_flops),
                                   peak_bandwidth=max(self.peak_bandwidth, other.peak_bandwidth), samples=samples)

    def ideal(self, flops: float, nbytes: float) -> dict:
        """Roofline time (s) of ``flops`` and ``nbytes``, and which limit binds."""
        compute, memory = flops / self.peak_flops, nbytes / self.peak_bandwidth
        return {"seconds": max(compute, memory), "compute_s": compute, "memory_s": memory,
                "bound": "compute" if compute >= memory else "memory"}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(device: str = "cpu", dtype: str = "fp32", *, matmul_n: int | None = None,
                 copy_mib: int | None = None, repeats: int = 3) -> DevicePeak:
    """Peak FLOP/s (square matmul of size ``matmul_n``) and bandwidth (copy of ``copy_mib`` MiB).

    CPU: the best of NumPy and PyTorch (each uses its own BLAS / threads). CUDA: PyTorch,
    timed with device synchronisation.
    """
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if device == "cuda":
        n, mib = matmul_n or 8192, copy_mib or 2048
        sync = torch.cuda.synchronize
        a = torch.randn(n, n, device="cuda", dtype=torch_dtype)
        b = torch.randn(n, n, device="cuda", dtype=torch_dtype)
        t_mm = _best(lambda: a @ b, repeats, sync)
        src = torch.ones(mib << 18, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        t_copy = _best(lambda: dst.copy_(src), repeats, sync)
        name = torch.cuda.get_device_name()
        method = f"torch.matmul {n}x{n} {dtype}, tensor.copy_ {mib} MiB (best of {repeats}, synchronised)"
        flops, bandwidth = 2 * n**3 / t_mm, 2 * (mib << 20) / t_copy
    else:
        n, mib = matmul_n or 2048, copy_mib or 256
        # fp16 matmul on CPU is emulated; the peak of the dtype actually computed in is what counts
        a = torch.randn(n, n, dtype=torch_dtype)
        b = torch.randn(n, n, dtype=torch_dtype)
        t_torch = _best(lambda: a @ b, repeats)
        an, bn = a.float().numpy(), b.float().numpy()
        t_numpy = _best(lambda: an @ bn, repeats) if dtype == "fp32" else float("inf")
        src = np.ones(mib << 18, dtype=np.float32)
        dst = np.empty_like(src)
        t_np_copy = _best(lambda: np.copyto(dst, src), repeats)
        ts, td = torch.from_numpy(src), torch.from_numpy(dst)
        t_torch_copy = _best(lambda: td.copy_(ts), repeats)
        t_mm, t_copy = min(t_torch, t_numpy), min(t_np_copy, t_torch_copy)
        name = cpu_name()
        method = (f"best of numpy/torch matmul {n}x{n} {dtype} and numpy/torch copy {mib} MiB "
                  f"(best of {repeats}; threads: torch {torch.get_num_threads()})")
        flops, bandwidth = 2 * n**3 / t_mm, 2 * (mib << 20) / t_copy
    return DevicePeak(device, name, dtype, flops, bandwidth, n, mib << 20, method, [(flops, bandwidth)])
