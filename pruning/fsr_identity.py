"""The FocusScanRefine operator's identity, read from ``focus_scan_refine.yaml`` (one place).

Domain, op type, version, inputs, outputs and the attributes with their types, defaults and
ranges live in that YAML file (laid out like TensorRT's ``*_PluginConfig.yaml``). This
module reads it once and gives every Python user (ONNX function builder, PyTorch forms,
graph passes, benchmark) the same names; the plugin build generates its C++ header from the
same file (``plugin/generate_identity_header.py``). ``tests/test_fsr_identity.py`` checks
that nothing spells the identity again.

Also here, because every form of the op needs them exactly alike:

- `check_attributes`: the attribute rules, with messages that name the op, the attribute and
  the rule (`FsrOpError`);
- `kept_count`: ``K`` from ``N`` and the attributes, exact for every float32 ``keep_ratio``;
- `keep_ratio_parts`: the integers the ONNX body and the plugin's shape expression use to
  compute that same ``K`` with integer arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import yaml

from fsr.errors import FsrError

IDENTITY_FILE = Path(__file__).with_name("focus_scan_refine.yaml")


class FsrOpError(FsrError, ValueError):
    """A FocusScanRefine node, call or input that breaks the op's rules; the message names
    the op, the attribute or input, and the rule."""


def _load(path: Path = IDENTITY_FILE) -> dict:
    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    [(version, spec)] = document["versions"].items()  # one version of the op today
    return {"name": document["name"], "domain": document["domain"], "interface": document["interface"],
            "version": int(version), **spec}


SPEC: dict = _load()

FSR_OP: str = SPEC["name"]
FSR_DOMAIN: str = SPEC["domain"]
FSR_OP_VERSION: int = SPEC["version"]
FSR_INPUTS: tuple[str, ...] = tuple(SPEC["inputs"])
FSR_OPTIONAL_INPUTS: tuple[str, ...] = tuple(SPEC["optional_inputs"])
FSR_OUTPUTS: tuple[str, ...] = tuple(SPEC["outputs"])
FSR_INPUT_RANKS: dict[str, int] = dict(SPEC["input_dims"])
FSR_INPUT_TYPES: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in SPEC["input_types"].items()}
FSR_ATTRIBUTES: tuple[str, ...] = tuple(SPEC["attributes"])
FSR_ATTRIBUTE_TYPES: dict[str, str] = dict(SPEC["attribute_types"])
FSR_ATTRIBUTE_DEFAULTS: dict[str, float] = {k: float(v) for k, v in SPEC["attribute_defaults"].items()}
FSR_REQUIRED_ATTRIBUTES: tuple[str, ...] = tuple(SPEC["attributes_required"])
FSR_ABS_TOL: float = float(SPEC["abs_tol"])
FSR_REL_TOL: float = float(SPEC["rel_tol"])
TENSORRT_TOPK_MAX_K: int = int(SPEC["limits"]["tensorrt_topk_max_k"])
PLUGIN_MAX_TOKENS: int = int(SPEC["limits"]["plugin_max_tokens"])

_HINTS = {
    "budget": "the number of tokens each row keeps; a budget >= N keeps all N",
    "keep_ratio": "0 leaves it unused (K from budget); a value in (0, 1] keeps floor(keep_ratio * N) tokens",
}


def _bound(text: str) -> tuple[float, bool]:
    """``"=x"`` -> (x, inclusive); ``"x"`` -> (x, exclusive); ``pinf`` / ``ninf`` -> infinities."""
    text = str(text).strip()
    inclusive = text.startswith("=")
    text = text.removeprefix("=")
    value = {"pinf": math.inf, "ninf": -math.inf}.get(text)
    return (float(text) if value is None else value), inclusive


ATTRIBUTE_RANGES: dict[str, tuple[tuple[float, bool], tuple[float, bool], bool]] = {
    name: (_bound(opts["min"]), _bound(opts["max"]), bool(opts.get("finite", False)))
    for name, opts in SPEC["attribute_options"].items()
}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _range_text(name: str, side: str | None = None) -> str:
    """The rule in words: the violated side (``"min"`` / ``"max"``) or the whole range."""
    (lo, lo_in), (hi, hi_in), _ = ATTRIBUTE_RANGES[name]
    lower = f"{'>=' if lo_in else '>'} {_num(lo)}"
    upper = f"{'<=' if hi_in else '<'} {_num(hi)}"
    if math.isinf(hi) or side == "min" and FSR_ATTRIBUTE_TYPES[name].startswith("int"):
        return lower
    if math.isinf(lo) or side == "max" and FSR_ATTRIBUTE_TYPES[name].startswith("int"):
        return upper
    return f"in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"


def float32(value: float) -> float:
    """The float32 value an ONNX FLOAT attribute holds (a Python float, exactly)."""
    return float(np.float32(value))


def check_attributes(**attributes) -> dict:
    """Validate FocusScanRefine attributes; return them complete and normalised.

    Missing optional attributes get their defaults; floats are rounded to float32 (what an
    ONNX node stores and every implementation computes with); ``budget`` becomes an int.
    Raises `FsrOpError` naming the op, the attribute and the rule.
    """
    unknown = sorted(set(attributes) - set(FSR_ATTRIBUTES))
    if unknown:
        raise FsrOpError(f"{FSR_OP}: unknown attribute(s) {unknown}; the op has {list(FSR_ATTRIBUTES)}")
    out = {}
    for name in FSR_ATTRIBUTES:
        if name not in attributes or attributes[name] is None:
            if name in FSR_REQUIRED_ATTRIBUTES:
                raise FsrOpError(f"{FSR_OP}: attribute {name} is required ({_HINTS.get(name, '')})")
            attributes[name] = FSR_ATTRIBUTE_DEFAULTS[name]
        value = given = attributes[name]
        kind = FSR_ATTRIBUTE_TYPES[name]
        (lo, lo_in), (hi, hi_in), finite = ATTRIBUTE_RANGES[name]
        hint = f" ({_HINTS[name]})" if name in _HINTS else ""
        if kind.startswith("int"):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
                raise FsrOpError(f"{FSR_OP}: attribute {name} must be an int {_range_text(name)}, "
                                 f"got {value!r}{hint}")
            value = int(value)
        else:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.floating, np.integer)):
                raise FsrOpError(f"{FSR_OP}: attribute {name} must be a finite number, got {value!r}")
            if finite and not math.isfinite(float(value)):
                raise FsrOpError(f"{FSR_OP}: attribute {name} must be a finite number, got {value!r}")
            value = float32(value)
        below = value < lo or (value == lo and not lo_in)
        above = value > hi or (value == hi and not hi_in)
        if below or above:
            side = "min" if below else "max"
            raise FsrOpError(f"{FSR_OP}: attribute {name} must be {_range_text(name, side)}, got {given!r}{hint}")
        out[name] = value
    return out


def keep_ratio_parts(keep_ratio: float) -> tuple[int, int]:
    """``(H, L)`` with ``float32(keep_ratio) * 2**48 == H * 2**24 + L`` (0 <= H, L < 2**24).

    Exact for every float32 in [2**-25, 1]; below that, ``floor(keep_ratio * N) == 0`` for
    every N < 2**25 and so is the formula of `kept_count_from_parts`. ``H`` and ``L`` are what
    the ONNX body computes from the attribute (``Floor`` and ``Cast`` of ``r * 2**24``) and
    what the plugin's creator passes to TensorRT's integer shape expressions.
    """
    scaled = np.float32(keep_ratio) * np.float32(2.0**24)  # exact: a power of two
    hi = np.floor(scaled)
    lo = (scaled - hi) * np.float32(2.0**24)  # the fraction, exact; an integer when r >= 2**-25
    return int(hi), int(lo)


def kept_count_from_parts(num_tokens: int, hi: int, lo: int) -> int:
    """``floor(r * N)`` from `keep_ratio_parts` with integer arithmetic only (``//`` = floor)."""
    return (hi * num_tokens + (lo * num_tokens) // 2**24) // 2**24


def kept_count(num_tokens: int, budget: int, keep_ratio: float = 0.0) -> int:
    """``K``: ``min(budget, N)``, or with ``keep_ratio > 0`` ``min(N, max(1, floor(keep_ratio * N)))``.

    ``keep_ratio`` is taken as the float32 a node stores, and the floor is of the exact
    product (no float rounding), so every implementation gets the same K.
    """
    if num_tokens < 1:
        raise FsrOpError(f"{FSR_OP}: input tokens has N = {num_tokens} tokens; the op needs N >= 1")
    ratio = float32(keep_ratio)
    if ratio > 0:
        return min(num_tokens, max(1, math.floor(Fraction(ratio) * num_tokens)))
    return min(int(budget), num_tokens)
