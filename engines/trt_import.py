"""Which TensorRT is installed: full TensorRT (``tensorrt``) or TensorRT-RTX (``tensorrt_rtx``).

Both expose the same Python API under different module names. Everything in
``fsr.engines`` and ``fsr.runtime.trt`` imports TensorRT through `import_tensorrt`,
so the rest of the code never names a flavour, and every engine records the one it
was built with.

Differences that matter here (checked against tensorrt-rtx 1.7):

- TensorRT-RTX builds ahead of time on a machine without a GPU; engines are
  specialised just in time on the GPU that runs them.
- TensorRT-RTX networks are always strongly typed (no ``BuilderFlag.FP16``/``BF16``):
  an engine computes in the types its ONNX graph carries. ``fsr-build`` therefore
  makes reduced precision by rewriting the graph (`fsr.engines.precision`), for both
  flavours, so the same ``--precision`` means the same numerics everywhere.
- TensorRT-RTX's timing-cache calls are no-ops.
- ``libfsr_plugin.so`` (``plugin/``) links full TensorRT's ``libnvinfer``; TensorRT-RTX
  cannot load it, so plugin engines need full TensorRT.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from types import ModuleType

from fsr.errors import FsrError

FLAVOURS = ("tensorrt", "tensorrt_rtx")  # preference order: full TensorRT first
INSTALL_HINT = "pip install tensorrt-rtx (CPU-only ahead-of-time builds) or install full TensorRT"


class TensorRTMissing(FsrError, ImportError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    flavour: str  # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt_rtx"

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.is_rtx else 'TensorRT'} {self.version}"

    @property
    def has_timing_cache(self) -> bool:
        return not self.is_rtx

    @property
    def has_plugin_support(self) -> bool:
        """Can this flavour load ``libfsr_plugin.so`` (built against full TensorRT)?"""
        return not self.is_rtx


_cache: dict[tuple, TensorRT] = {}


def import_tensorrt(flavour: str | None = None) -> TensorRT:
    """Import TensorRT: ``flavour`` if given, else ``tensorrt`` if installed, else ``tensorrt_rtx``."""
    names = (flavour,) if flavour else FLAVOURS
    key = tuple(names)
    if key in _cache:
        return _cache[key]
    errors = []
    for name in names:
        if name not in FLAVOURS:
            raise ValueError(f"unknown TensorRT flavour {name!r}; one of {', '.join(FLAVOURS)}")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # includes a present package whose native libraries fail to load
            errors.append(f"{name}: {exc}")
            continue
        found = TensorRT(module, name, getattr(module, "__version__", "?"))
        _cache[key] = found
        return found
    wanted = " or ".join(f"'{n}'" for n in names)
    raise TensorRTMissing(f"TensorRT is not installed (cannot import {wanted}: {'; '.join(errors)}); "
                          f"{INSTALL_HINT}")


def make_logger(trt: TensorRT, verbose: bool = False):
    """A TensorRT logger that keeps warnings and errors (``.messages``) for error reports,
    printing TensorRT's log to stderr only when ``verbose``."""
    base = trt.module.ILogger
    severity = trt.module.ILogger.Severity

    class CollectingLogger(base):
        def __init__(self):
            base.__init__(self)
            self.messages: list[str] = []

        def log(self, level, msg):
            if int(level) <= int(severity.WARNING):
                self.messages.append(f"[{level.name}] {msg}")
                del self.messages[:-50]
            if verbose:
                print(f"[TensorRT {level.name}] {msg}", file=sys.stderr)

        def errors(self) -> list[str]:
            return [m for m in self.messages if not m.startswith("[WARNING]")]

    return CollectingLogger()
