"""Per-output tolerances: defaults per precision, and ``--tol name=atol,rtol`` overrides.

A comparison passes element by element when ``|a - b| <= atol`` or ``|a - b| <= rtol * |b|``
(Polygraphy's ``elemwise`` check, ``b`` = the PyTorch reference). ``kept_indices`` is an
index set: it is compared exactly (atol = rtol = 0) whatever the precision.

Output names are matched by pattern so one entry covers every layer's KV cache
(``present.*``). The first matching pattern wins; ``*`` is the default.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from fsr.errors import FsrError


class ToleranceError(FsrError, ValueError):
    """A malformed ``--tol`` value; the message shows the expected form."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


EXACT = Tolerance(0.0, 0.0)

#: Defaults per export precision, pattern -> tolerance (first match wins). fp32 graphs are
#: the same arithmetic as PyTorch in another order: errors are a few ulps times the depth.
#: fp16 graphs are compared with an fp32 reference run on the same (fp16) weights, so the
#: error is fp16 rounding of every activation (relative ~1e-3 per op, compounding).
DEFAULTS: dict[str, dict[str, Tolerance]] = {
    "fp32": {
        "kept_indices": EXACT,
        "inputs_embeds": Tolerance(1e-6, 1e-6),  # a gather: exact in practice
        "*": Tolerance(1e-4, 1e-3),
    },
    "fp16": {
        "kept_indices": EXACT,
        "inputs_embeds": Tolerance(1e-3, 1e-3),  # fp16 rounding of the table only
        "*": Tolerance(5e-3, 1e-2),
    },
    "bf16": {  # TensorRT engines built with --precision bf16: 8 mantissa bits
        "kept_indices": EXACT,
        "inputs_embeds": Tolerance(1e-2, 1e-2),
        "*": Tolerance(3e-2, 5e-2),
    },
}

#: How close two FSR decision scores (phi, Scan distances, the K_F prefix sum) must be,
#: relative to the score scale, for a differing kept index to count as a near-tie.
NEAR_TIE_DEFAULTS = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}

#: How close two logits must be (absolute) for a differing greedy token to count as a
#: near-tie in the end-to-end comparison.
LOGIT_NEAR_TIE_DEFAULTS = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


def parse_overrides(values: list[str] | None) -> dict[str, Tolerance]:
    """``["logits=1e-4,1e-3", "present.*=1e-3,1e-2"]`` -> {pattern: Tolerance}.

    One number means atol = rtol = that number.
    """
    out: dict[str, Tolerance] = {}
    for value in values or []:
        for item in value.split(";"):
            item = item.strip()
            if not item:
                continue
            name, sep, numbers = item.partition("=")
            if not sep or not name.strip():
                raise ToleranceError(f"--tol {item!r}: expected OUTPUT=ATOL,RTOL (e.g. logits=1e-4,1e-3)")
            parts = [p for p in numbers.split(",") if p.strip()]
            try:
                nums = [float(p) for p in parts]
            except ValueError:
                raise ToleranceError(f"--tol {item!r}: {numbers!r} is not ATOL,RTOL numbers") from None
            if len(nums) == 1:
                nums = nums * 2
            if len(nums) != 2 or min(nums) < 0:
                raise ToleranceError(f"--tol {item!r}: expected two numbers >= 0, ATOL,RTOL")
            out[name.strip()] = Tolerance(*nums)
    return out


class ToleranceTable:
    """Resolves the tolerance of an output from overrides, then the precision's defaults."""

    def __init__(self, dtype: str, overrides: dict[str, Tolerance] | None = None):
        if dtype not in DEFAULTS:
            raise ToleranceError(f"no default tolerances for precision {dtype!r} (known: {', '.join(DEFAULTS)})")
        self.dtype = dtype
        self.overrides = dict(overrides or {})

    def __call__(self, output: str) -> Tolerance:
        for table in (self.overrides, DEFAULTS[self.dtype]):
            for pattern, tol in table.items():
                if pattern != "*" and fnmatch.fnmatchcase(output, pattern):
                    return tol
        for table in (self.overrides, DEFAULTS[self.dtype]):
            if "*" in table:
                return table["*"]
        raise AssertionError("DEFAULTS has a '*' entry for every precision")

    def for_outputs(self, outputs: list[str]) -> dict[str, Tolerance]:
        return {name: self(name) for name in outputs}
