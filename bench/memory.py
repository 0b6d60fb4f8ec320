"""Peak memory of one measurement: process RSS high-water mark on the CPU, PyTorch's allocator peak
on CUDA (torch backend), the device's used memory after the run for engines that allocate
outside PyTorch (TensorRT).

On Linux the RSS high-water mark (``VmHWM``) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so each measurement gets its own peak. Where that is not
possible the lifetime peak from ``resource.getrusage`` is reported and marked so.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _device_used() -> int:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakMemory:
    """``reset()`` before a measurement, ``read()`` after: ``{bytes, kind, at_reset_bytes}``."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.kind = {"cuda": "cuda_max_memory_allocated",
                     # engines allocate outside PyTorch: the device's used memory after the run
                     "cuda-device": "cuda_device_used_after_run"}.get(device, "rss_high_water")
        self._at_reset: int | None = None

    def reset(self) -> None:
        if self.device == "cuda-device":
            self._at_reset = _device_used()
            return
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._at_reset = torch.cuda.memory_allocated()
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.kind = "rss_high_water_lifetime"  # cannot reset: the process's peak so far
        self._at_reset = rss_bytes()

    def read(self) -> dict:
        if self.device == "cuda-device":
            return {"bytes": _device_used(), "kind": self.kind, "at_reset_bytes": self._at_reset}
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            kib = _status_kib("VmHWM")
            if kib is None:  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = peak if sys.platform == "darwin" else peak * 1024
                self.kind = "rss_high_water_lifetime"
            else:
                peak = kib * 1024
        return {"bytes": int(peak), "kind": self.kind, "at_reset_bytes": self._at_reset}
