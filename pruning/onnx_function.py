"""FocusScanRefine as an ONNX local function (domain ``fsr``, op ``FocusScanRefine``).

`build_fsr_function` writes the op's one function body by hand (``onnx.helper``), as the
graph form of `FocusScanRefineFixed` (``fsr_fixed.py``: same steps, same names). The body
is an **operator**, not a snapshot:

- every attribute comes from the calling node through ONNX attribute references
  (``ref_attr_name``): ``budget`` (required), ``alpha``, ``beta``, ``rho``, ``kappa`` and
  ``keep_ratio`` (defaults in the function's ``attribute_proto``, from the op's YAML);
- ``N`` and the batch come from the input shapes at run time; ``K = min(budget, N)``, or
  ``min(N, max(1, floor(keep_ratio * N)))`` with ``keep_ratio > 0`` (exact integer
  arithmetic, as `fsr_identity.kept_count`);
- the exponents ``alpha`` / ``beta`` are evaluated at run time with the power convention
  (``pruning/README.md`` #3): an integer n in 0..16 as a left-to-right product chain (a
  ``Loop`` of n ``Mul``), ``n + 0.5`` with one more ``Sqrt``, anything else with ``Pow``;
- ``tokens`` may be float16 or float32 (the merge is float32, cast back with ``CastLike``),
  ``features`` / ``saliency`` / ``relevance`` any float type;
- ``relevance`` is optional in the same body: a node that passes ``""`` gets ``r_hat = 1``
  (the body reads it as the optional ``C`` input of a ``Gemm`` of zeros: the relevance
  itself when given, zeros, a constant row, otherwise);
- nothing grows with the budget: Scan is one ``Loop`` whose iterations each take a block
  of greedy steps (``SCAN_BLOCK`` candidates' columns per matrix product; see
  ``fsr_fixed.py``), so the body has the same few hundred nodes for every budget and N.

The body is standard opset 18, no sequences, no ``If``; TopK's k is at most N (TensorRT
caps it at 3,840: for larger N use the plugin). The function's ``metadata_props`` record
what the body is (`fsr_function_settings`); `restore_function_metadata` puts them back
where onnx-graphsurgeon drops them.

`make_fsr_model` wraps the function in a one-node model (dynamic N by default);
`check_fsr_node` / `check_fsr_model` check a node against the op's rules at graph-build time.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from .fsr_fixed import FAR, NOT_ANCHOR, NOT_DISCARDED, SCAN_BLOCK, TAKEN
from .fsr_identity import (
    FSR_ATTRIBUTE_DEFAULTS,
    FSR_ATTRIBUTE_TYPES,
    FSR_ATTRIBUTES,
    FSR_DOMAIN,
    FSR_INPUT_RANKS,
    FSR_INPUT_TYPES,
    FSR_INPUTS,
    FSR_OP,
    FSR_OP_VERSION,
    FSR_OPTIONAL_INPUTS,
    FSR_OUTPUTS,
    FSR_REQUIRED_ATTRIBUTES,
    FsrOpError,
    check_attributes,
    kept_count,
)

#: ONNX (default domain) opset of the function body.
FSR_BODY_OPSET = 18
#: IR version of models made here (onnxruntime 1.31 rejects newer ones).
FSR_IR_VERSION = 10
#: Version of the body's construction, recorded in its metadata.
FSR_BODY_VERSION = 2

_METADATA_PREFIX = "fsr."
_DOC_MARKER = "\nfsr-metadata: "
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_TYPE_NAMES = {v: k for k, v in _ONNX_TYPES.items()}
_FLOAT, _INT64, _BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
_BIG = float(2**25)  # above every float32 token index used here (N < 2**23)
_BELOW = -5.0  # below every running min-distance, TAKEN included
_TWO24 = float(2**24)


def fsr_node_attributes(*, budget, alpha=None, beta=None, rho=None, kappa=None, keep_ratio=None) -> dict:
    """The attribute dict of a FocusScanRefine node (validated; int budget, float32 floats)."""
    return check_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa, keep_ratio=keep_ratio)


def onnx_dtype(dtype) -> int:
    """ONNX element type of a torch / NumPy float dtype or a name (float32, float16)."""
    name = str(dtype).removeprefix("torch.")
    name = {"float": "float32", "half": "float16"}.get(name, name)
    try:
        return _ONNX_TYPES[name]
    except KeyError:
        raise FsrOpError(f"{FSR_OP}: unsupported dtype {dtype}; use one of {list(_ONNX_TYPES)}") from None


# --------------------------------------------------------------------------- the body


class _Names:
    """Fresh value / node names, unique across the body and its loop bodies."""

    def __init__(self, used=()):
        self._used = set(used)

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name


class _Graph:
    """Nodes of a function body or a loop body: ``g("Add", a, b)`` returns the output name."""

    def __init__(self, names: _Names):
        self.names = names
        self.nodes: list[onnx.NodeProto] = []
        self._constants: dict[tuple, str] = {}

    def __call__(self, op: str, *inputs: str, out: str | None = None, outputs: int = 1, **attrs):
        base = out or op.lower()
        names = [self.names(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.names(f"{base}_node"), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """A Constant (scalar or 1-D) of ``dtype``; equal constants are made once."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self("Constant", out="c", value=onnx.numpy_helper.from_array(array))
        return self._constants[key]

    def attribute(self, name: str) -> str:
        """A scalar Constant holding the calling node's attribute ``name`` (ref_attr_name)."""
        kind = FSR_ATTRIBUTE_TYPES[name]
        field, type_ = ("value_int", onnx.AttributeProto.INT) if kind.startswith("int") else \
            ("value_float", onnx.AttributeProto.FLOAT)
        out = self.names(name)
        node = helper.make_node("Constant", [], [out], name=self.names(f"{name}_node"))
        ref = node.attribute.add()
        ref.name, ref.ref_attr_name, ref.type = field, name, type_
        self.nodes.append(node)
        return out

    # Small recurring pieces --------------------------------------------------------------

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self("Unsqueeze", x, self.const(list(axes), np.int64))

    def squeeze(self, x: str, *axes: int) -> str:
        return self("Squeeze", x, self.const(list(axes), np.int64))

    def reduce(self, op: str, x: str, axis: int, keepdims: int, out: str | None = None) -> str:
        return self(op, x, self.const([axis], np.int64), keepdims=keepdims, out=out)

    def cast(self, x: str, to: int) -> str:
        return self("Cast", x, to=to)


def _loop_body(g: _Graph, name: str, carried: list[tuple[str, int, int]], build):
    """A Loop body graph: inputs (iteration, cond, *carried), outputs (cond, *carried).

    ``carried`` lists (name, elem type, rank); ``build(body, values) -> (cond, new values)``.
    """
    body = _Graph(g.names)
    body._constants = g._constants.copy()  # outer constants are visible inside
    iteration, cond = g.names(f"{name}_iter"), g.names(f"{name}_cond")
    inputs = [helper.make_tensor_value_info(iteration, _INT64, []),
              helper.make_tensor_value_info(cond, _BOOL, [])]
    values = []
    for value_name, elem, rank in carried:
        value = g.names(f"{name}_{value_name}")
        inputs.append(helper.make_tensor_value_info(value, elem, [None] * rank))
        values.append(value)
    cond_out, outs = build(body, cond, values)
    cond_out = body("Identity", cond_out, out=f"{name}_cond_out")
    outs = [body("Identity", v, out=f"{name}_{c[0]}_out") for v, c in zip(outs, carried)]
    outputs = [helper.make_tensor_value_info(cond_out, _BOOL, [])]
    outputs += [helper.make_tensor_value_info(v, c[1], [None] * c[2]) for v, c in zip(outs, carried)]
    return helper.make_graph(body.nodes, name, inputs, outputs)


def _norm01(g: _Graph, x: str) -> str:
    lo = g.reduce("ReduceMin", x, 1, 1)
    hi = g.reduce("ReduceMax", x, 1, 1)
    span = g("Sub", hi, lo)
    flat = g("Equal", span, g.const(0.0))
    scaled = g("Div", g("Sub", x, lo), g("Where", flat, g.const(1.0), span))
    return g("Where", flat, g.const(1.0), scaled, out="norm01")


def _power(g: _Graph, x: str, exponent: str) -> str:
    """``x ** exponent`` (float32 scalar from an attribute) with the power convention."""
    twice = g("Mul", exponent, g.const(2.0))
    whole = g("Floor", exponent)
    exact = g("And", g("And", g("GreaterOrEqual", exponent, g.const(0.0)),
                       g("Equal", twice, g("Floor", twice))),
              g("LessOrEqual", twice, g.const(33.0)))  # n + h/2 with 0 <= n <= 16
    trips = g("Where", exact, g.cast(whole, _INT64), g.const(0, np.int64))

    def chain(body, cond, values):
        [acc] = values
        return cond, [body("Mul", acc, x, out="chain")]

    ones = g("Expand", g.const(1.0), g("Shape", x))
    loop = _loop_body(g, "power_chain", [("acc", _FLOAT, 2)], chain)
    always = g.const(True, np.bool_)
    product = g("Loop", trips, always, ones, body=loop, out="chain_product")  # ((x*x)*x)..., x**0 = 1
    half = g("Equal", g("Sub", twice, g("Mul", whole, g.const(2.0))), g.const(1.0))
    exact_value = g("Where", half, g("Mul", product, g("Sqrt", x)), product)
    return g("Where", exact, exact_value, g("Pow", x, exponent), out="power")


def _select_largest(g: _Graph, values: str, count: str, sorted_values: str) -> str:
    """`fsr_fixed.select_largest`: the ``count [B]`` largest per row, ties to the lower index."""
    take = g.unsqueeze(g("Max", count, g.const(1, np.int64)), 1)  # [B, 1]
    v = g("GatherElements", sorted_values, g("Sub", take, g.const(1, np.int64)), axis=1)
    above = g("Greater", values, v)
    tie = g("Equal", values, v)
    need = g("Sub", take, g.reduce("ReduceSum", g.cast(above, _INT64), 1, 1))
    tie_rank = g("CumSum", g.cast(tie, _FLOAT), g.const(1, np.int64), exclusive=1)  # exact counts
    chosen = g("Or", above, g("And", tie, g("Less", tie_rank, g.cast(need, _FLOAT))))
    return g("And", chosen, g.unsqueeze(g("Greater", count, g.const(0, np.int64)), 1), out="selected")


def _first_indices(g: _Graph, mask: str, width: str, iota_f: str, n_f: str) -> str:
    """`fsr_fixed.first_indices`: ``[B, width]`` indices of ``mask`` ascending, then padding."""
    key = g("Add", iota_f, g("Mul", g.cast(g("Not", mask), _FLOAT), n_f))  # distinct, exact
    _, indices = g("TopK", key, width, axis=-1, largest=0, sorted=1, outputs=2, out="first")
    return indices


def _rows(g: _Graph, flat: str, index: str, base: str) -> str:
    """Rows at ``index [B, C]`` of ``x [B, N, W]`` given as ``flat = Flatten(x, 2)`` ``[B*N, W]``
    and ``base = [[0], [N], [2N], ...]``: ``[B, C, W]`` (one Gather of whole rows)."""
    return g("Gather", flat, g("Add", index, base), axis=0, out="rows")


def _column_cosines(g: _Graph, features: str, flat: str, base: str, columns: str, sq_norm: str) -> str:
    """`_numerics.column_cosines` for the columns of the tokens ``columns [B, C]``."""
    rows = _rows(g, flat, columns, base)
    gram = g("MatMul", features, g("Transpose", rows, perm=[0, 2, 1]), out="gram")  # [B, N, C]
    own = g("GatherElements", gram, g.unsqueeze(columns, 1), axis=1)  # [B, 1, C]: G[c, c]
    n_i = g.unsqueeze(sq_norm, 2)
    n_c = g.unsqueeze(g("GatherElements", sq_norm, columns, axis=1), 1)
    denominator = g("Sqrt", g("Mul", n_i, n_c))
    cos = g("Div", gram, denominator)  # NaN where the denominator is 0: replaced below
    duplicate = g("And", g("Equal", gram, own), g("Equal", n_i, n_c))
    cos = g("Where", duplicate, g.const(1.0), cos)
    return g("Where", g("Greater", denominator, g.const(0.0)), cos, g.const(0.0), out="cos")


def _argmax_lowest(g: _Graph, x: str, iota_f: str) -> str:
    """``[B, 1]`` float: the index of the row maximum, the lowest on ties (no TopK tie rule)."""
    top = g.reduce("ReduceMax", x, 1, 1)
    return g.reduce("ReduceMin", g("Where", g("Equal", x, top), iota_f, g.const(_BIG)), 1, 1, out="argmax")


def _build_body(scan_block: int) -> tuple[list[onnx.NodeProto], list[onnx.AttributeProto]]:
    g = _Graph(_Names([*FSR_INPUTS, *FSR_OUTPUTS]))
    tokens, features, saliency, relevance = FSR_INPUTS
    attr = {name: g.attribute(name) for name in FSR_ATTRIBUTES}

    # Sizes: N and B from the input shapes; K from the attributes (fsr_identity.kept_count).
    shape = g("Shape", saliency)
    n = g("Gather", shape, g.const(1, np.int64), axis=0, out="n")
    n1 = g.unsqueeze(n, 0)
    b1 = g("Slice", shape, g.const([0], np.int64), g.const([1], np.int64), out="b1")
    n_f = g.cast(n, _FLOAT)
    iota = g("Range", g.const(0, np.int64), n, g.const(1, np.int64), out="iota")
    iota_f = g.cast(iota, _FLOAT)
    scaled = g("Mul", attr["keep_ratio"], g.const(_TWO24))
    hi_f = g("Floor", scaled)
    lo_f = g("Mul", g("Sub", scaled, hi_f), g.const(_TWO24))
    two24 = g.const(2**24, np.int64)
    by_ratio = g("Div", g("Add", g("Mul", g.cast(hi_f, _INT64), n),
                          g("Div", g("Mul", g.cast(lo_f, _INT64), n), two24)), two24)
    by_ratio = g("Min", n, g("Max", by_ratio, g.const(1, np.int64)))
    k = g("Where", g("Greater", attr["keep_ratio"], g.const(0.0)), by_ratio,
          g("Min", attr["budget"], n), out="k")
    k1 = g.unsqueeze(k, 0)
    identity = g("Equal", k, n)

    # Scores: phi = r_hat**alpha * s_hat**beta; an omitted relevance is read as zeros.
    zeros_b = g("CastLike", g("ConstantOfShape", g("Concat", b1, g.const([1], np.int64), axis=0)), saliency)
    zeros_n = g("CastLike", g("ConstantOfShape", g("Concat", g.const([1], np.int64), n1, axis=0)), saliency)
    relevance_or_zeros = g("Gemm", zeros_b, zeros_n, relevance, out="relevance_or_zeros")
    s_hat = _norm01(g, g.cast(saliency, _FLOAT))
    r_hat = _norm01(g, g.cast(relevance_or_zeros, _FLOAT))
    phi = g("Mul", _power(g, r_hat, attr["alpha"]), _power(g, s_hat, attr["beta"]), out="phi")

    # Focus.
    phi_sorted, _ = g("TopK", phi, n1, axis=-1, largest=1, sorted=1, outputs=2, out="phi_sorted")
    prefix = g("CumSum", phi_sorted, g.const(1, np.int64), out="prefix")  # sequential float32
    total = g("Gather", prefix, g("Sub", n1, g.const(1, np.int64)), axis=1)  # [B, 1]
    threshold = g("Mul", total, attr["rho"])
    below = g.reduce("ReduceSum", g.cast(g("Less", prefix, threshold), _INT64), 1, 0)
    kf = g("Min", g("Add", below, g.const(1, np.int64)), k)
    kf = g("Where", identity, n, kf, out="kf")  # K = N: everything is kept, nothing scanned
    focus = _select_largest(g, phi, kf, phi_sorted)

    # Running min-distance to the focus set, from the focus tokens' columns (only when Scan
    # runs: with no Scan step anywhere one column of token 0 is computed and not used).
    f = g.cast(features, _FLOAT)
    f_flat = g("Flatten", f, axis=2)
    base = g.unsqueeze(g("Mul", g("Range", g.const(0, np.int64), g.squeeze(b1, 0), g.const(1, np.int64)), n), 1)
    steps = g("Sub", k, kf, out="steps")  # [B] = |S|
    steps_max = g.reduce("ReduceMax", steps, 0, 0)
    no_scan = g("Equal", steps_max, g.const(0, np.int64))
    # n_i: squares added one at a time in k order (convention 6), a CumSum over F. Only Scan reads
    # them: with no Scan step anywhere, token 0's alone (the one column below is then token 0's).
    norm_rows = g("Where", no_scan, g.const([1], np.int64), n1)
    f_used = g("Slice", f, g.const([0], np.int64), norm_rows, g.const([1], np.int64))
    squares = g("Mul", *[g("Transpose", f_used, perm=[0, 2, 1])] * 2)  # [B, F, N]: sequential over F, vector over N
    last = g("Sub", g("Gather", g("Shape", features), g.const(2, np.int64), axis=0), g.const(1, np.int64))
    sq_norm = g("Gather", g("CumSum", squares, g.const(1, np.int64)), last, axis=1, out="sq_norm")  # [B, N]
    width = g.unsqueeze(g("Where", no_scan, g.const(1, np.int64), g.reduce("ReduceMax", kf, 0, 0)), 0)
    columns = _first_indices(g, focus, width, iota_f, n_f)
    real = g("Less", g.unsqueeze(g("Range", g.const(0, np.int64), g.squeeze(width, 0), g.const(1, np.int64)), 0),
             g.unsqueeze(kf, 1))
    columns = g("Where", real, columns, g("Slice", columns, g.const([0], np.int64), g.const([1], np.int64),
                                          g.const([1], np.int64)))  # pad with a focus token: same minimum
    columns = g("Where", no_scan, g.const(0, np.int64), columns)
    cos = _column_cosines(g, f, f_flat, base, columns, sq_norm)
    # min_j (1 - cos) == 1 - max_j cos: rounding 1 - x is monotone.
    nearest = g("Sub", g.const(1.0), g.reduce("ReduceMax", cos, 2, 0))
    dmin0 = g("Where", focus, g.const(TAKEN), nearest, out="dmin")

    # Scan: a Loop of blocks (fsr_fixed.FocusScanRefineFixed._scan_block).
    steps_f = g.cast(steps, _FLOAT)
    extra = g.unsqueeze(g("Min", g.const(scan_block - 1, np.int64), n), 0)  # TopK candidates
    slots = g("Add", g.squeeze(extra, 0), g.const(1, np.int64))
    steps_f1 = g.unsqueeze(steps_f, 1)  # [B, 1]
    block_base = g.unsqueeze(g("Mul", g("Range", g.const(0, np.int64), g.squeeze(b1, 0), g.const(1, np.int64)),
                               slots), 1)  # [B, 1]: first candidate row of each batch row

    def scan_one_block(body, cond, values):
        dmin, done, best_sim, best_anchor = values
        first = _argmax_lowest(body, dmin, iota_f)
        _, more = body("TopK", dmin, extra, axis=-1, largest=1, sorted=1, outputs=2, out="candidates")
        candidates = body("Concat", body.cast(first, _INT64), more, axis=1, out="candidates")  # [B, C]
        candidates_f = body.cast(candidates, _FLOAT)
        block_cos = _column_cosines(body, f, f_flat, base, candidates, sq_norm)  # [B, N, C]
        # distance[b, i, m]: token i to candidate m; TAKEN where i is candidate m itself.
        itself = body("Equal", body.unsqueeze(iota_f, 1), body.unsqueeze(candidates_f, 1))  # [B, N, C]
        distance = body("Where", itself, body.const(TAKEN), body("Sub", body.const(1.0), block_cos))
        # Between candidates: rows[b, s, m] = distance of candidate m to candidate s (a row per pick).
        among = body("Gather", body("Flatten", distance, axis=2), body("Add", candidates, base), axis=0)
        rows = body("Flatten", body("Transpose", among, perm=[0, 2, 1]), axis=2, out="candidate_rows")
        # The greedy steps of the block run on the C candidates alone. The first step takes the
        # global argmax (the first candidate); a later step's pick is sure to be the global
        # argmax when its value is above every other token's value at the block's start (those
        # only go down). A step that is not sure ends the block (the steps after it repeat it).
        is_candidate = body("Greater", body.reduce("ReduceMax", body.cast(itself, _FLOAT), 2, 0), body.const(0.0))
        bound = body.unsqueeze(body.reduce("ReduceMax", body("Where", is_candidate, body.const(_BELOW), dmin), 1, 1), 2)
        remaining = body.unsqueeze(body("Sub", steps_f1, done), 2)  # [B, 1, 1] steps this row still takes
        start = body.unsqueeze(body("GatherElements", dmin, candidates, axis=1), 1)  # [B, 1, C]
        candidate_key = body.unsqueeze(candidates_f, 1)
        current = start
        for step in range(scan_block):
            top = body.reduce("ReduceMax", current, 2, 1)  # [B, 1, 1]
            key = body("Where", body("Equal", current, top), candidate_key, body.const(_BIG))
            slot = body("ArgMin", key, axis=2, keepdims=1)  # the lowest token index at the top (ties: one token)
            live = body("Less", body.const(float(step)), remaining)
            if step:
                live = body("And", live, body("Greater", top, bound))
            row = body("Gather", rows, body("Add", body.squeeze(slot, 2), block_base), axis=0)  # [B, 1, C]
            current = body("Where", live, body("Min", current, row), current, out="current")
        picked = body.squeeze(body("And", body("Equal", current, body.const(TAKEN)),
                                   body("Not", body("Equal", start, body.const(TAKEN)))), 1)  # [B, C]
        # Every token's running minimum over the anchors this block took (TAKEN for them).
        nearest = body.reduce("ReduceMin", body("Where", body.unsqueeze(picked, 1), distance, body.const(FAR)), 2, 0)
        before = body.reduce("ReduceSum", body.cast(body("Equal", dmin, body.const(TAKEN)), _FLOAT), 1, 1)
        dmin = body("Min", dmin, nearest, out="dmin")
        taken_now = body.reduce("ReduceSum", body.cast(body("Equal", dmin, body.const(TAKEN)), _FLOAT), 1, 1)
        done = body("Add", done, body("Sub", taken_now, before), out="done")  # [B, 1]
        # Nearest anchor and similarity of every token, over the anchors this block took.
        masked = body("Where", body.unsqueeze(picked, 1), block_cos, body.const(NOT_ANCHOR))
        block_best = body.reduce("ReduceMax", masked, 2, 0)
        lowest = body("Where", body("Equal", masked, body.unsqueeze(block_best, 2)),
                      body.unsqueeze(candidates_f, 1), body.const(_BIG))
        block_anchor = body.reduce("ReduceMin", lowest, 2, 0)
        better = body("Or", body("Greater", block_best, best_sim),
                      body("And", body("Equal", block_best, best_sim), body("Less", block_anchor, best_anchor)))
        better = body("And", better, body("Greater", block_best, body.const(NOT_ANCHOR)))
        best_sim = body("Where", better, block_best, best_sim, out="best_sim")
        best_anchor = body("Where", better, block_anchor, best_anchor, out="best_anchor")
        left = body("ReduceMax", body("Sub", steps_f1, done), keepdims=0)
        return body("Greater", left, body.const(0.0)), [dmin, done, best_sim, best_anchor]

    loop = _loop_body(g, "scan", [("dmin", _FLOAT, 2), ("done", _FLOAT, 2), ("best_sim", _FLOAT, 2),
                                  ("best_anchor", _FLOAT, 2)], scan_one_block)
    zeros_bn = g("Mul", dmin0, g.const(0.0))  # [B, N] zeros (dmin0 is finite)
    dmin, _, best_sim, best_anchor = g(
        "Loop", steps_max, g("Greater", steps_max, g.const(0, np.int64)), dmin0,
        g("Mul", steps_f1, g.const(0.0)), g("Add", zeros_bn, g.const(NOT_ANCHOR)), g("Add", zeros_bn, n_f),
        body=loop, outputs=4, out="scan")

    # Refine: D_top, the M most similar discarded tokens.
    taken = g("Equal", dmin, g.const(TAKEN), out="taken")
    discarded = g("Not", taken)
    limit = g("Min", g.cast(g("Floor", g("Mul", attr["kappa"], steps_f)), _INT64), g("Sub", n, k), out="limit")
    width = g.unsqueeze(g("Max", g.reduce("ReduceMax", limit, 0, 0), g.const(1, np.int64)), 0)
    score = g("Where", discarded, best_sim, g.const(NOT_DISCARDED), out="score")
    top_values, _ = g("TopK", score, width, axis=-1, largest=1, sorted=1, outputs=2, out="top_values")
    top = g("And", _select_largest(g, score, limit, top_values), discarded, out="d_top")

    # Kept slots in ascending index order; merge D_top into their anchors.
    kept = _first_indices(g, taken, k1, iota_f, n_f)
    g.nodes.append(helper.make_node("Identity", [kept], ["kept_indices"], name=g.names("kept_indices_node")))
    tokens_flat = g("Flatten", tokens, axis=2)
    kept_tokens = _rows(g, tokens_flat, kept, base)  # [B, K, D], untouched unless merged
    taken_f = g.cast(taken, _FLOAT)
    slot_of = g("CumSum", taken_f, g.const(1, np.int64), exclusive=1, out="slot_of")  # exact counts
    members = _first_indices(g, top, width, iota_f, n_f)
    member = g("Less", g.unsqueeze(g("Range", g.const(0, np.int64), g.squeeze(width, 0), g.const(1, np.int64)), 0),
               g.unsqueeze(limit, 1))
    anchor_of = g("Min", g("GatherElements", best_anchor, members, axis=1), g("Sub", n_f, g.const(1.0)))
    target = g("GatherElements", slot_of, g.cast(anchor_of, _INT64), axis=1)  # [B, W] kept slot of j*(i)
    # The kept slots that receive D_top tokens ("groups", ascending): only their rows are merged.
    slot_iota_f = g.cast(g("Range", g.const(0, np.int64), k, g.const(1, np.int64)), _FLOAT)  # [K]
    hits = g("And", g.unsqueeze(member, 1), g("Equal", g.unsqueeze(target, 1), g.unsqueeze(slot_iota_f, 1)))
    is_target = g("Greater", g.reduce("ReduceMax", g.cast(hits, _FLOAT), 2, 0), g.const(0.0))  # [B, K]
    is_target_f = g.cast(is_target, _FLOAT)
    count = g.cast(g.reduce("ReduceSum", is_target_f, 1, 0), _INT64)
    group_width = g.unsqueeze(g("Max", g.reduce("ReduceMax", count, 0, 0), g.const(1, np.int64)), 0)
    groups = _first_indices(g, is_target, group_width, slot_iota_f, g.cast(k, _FLOAT))  # [B, A] kept slots
    assigned = g("And", g.unsqueeze(member, 1),
                 g("Equal", g.unsqueeze(target, 1), g.unsqueeze(g.cast(groups, _FLOAT), 2)), out="assigned")
    weight = g("Where", assigned, g.unsqueeze(g("GatherElements", phi, members, axis=1), 1), g.const(0.0))
    group_token = g("GatherElements", kept, groups, axis=1)  # [B, A] original index of each merged anchor
    phi_group = g("GatherElements", phi, group_token, axis=1)
    numerator = g("Add", g("Mul", g.unsqueeze(phi_group, 2), g.cast(_rows(g, tokens_flat, group_token, base), _FLOAT)),
                  g("MatMul", weight, g.cast(_rows(g, tokens_flat, members, base), _FLOAT)), out="numerator")
    denominator = g("Add", phi_group, g.reduce("ReduceSum", weight, 2, 0), out="denominator")  # [B, A]
    nonzero = g("Not", g("Equal", denominator, g.const(0.0)))
    merged = g("CastLike", g("Div", numerator, g.unsqueeze(g("Where", nonzero, denominator, g.const(1.0)), 2)),
               tokens)  # [B, A, D]
    # Each kept slot: its merged row when it is a group with a non-zero denominator, else its token.
    position = g.cast(g("CumSum", is_target_f, g.const(1, np.int64), exclusive=1), _INT64)  # [B, K]
    position = g("Min", position, g("Sub", g.squeeze(group_width, 0), g.const(1, np.int64)))
    use = g("And", is_target, g("GatherElements", nonzero, position, axis=1))
    group_base = g.unsqueeze(g("Mul", g("Range", g.const(0, np.int64), g.squeeze(b1, 0), g.const(1, np.int64)),
                                g.squeeze(group_width, 0)), 1)
    merged_rows = _rows(g, g("Flatten", merged, axis=2), position, group_base)  # [B, K, D]
    g.nodes.append(helper.make_node("Where", [g.unsqueeze(use, 2), merged_rows, kept_tokens], ["pruned"],
                                    name=g.names("pruned_node")))

    defaults = [helper.make_attribute(name, FSR_ATTRIBUTE_DEFAULTS[name]) for name in FSR_ATTRIBUTES
                if name not in FSR_REQUIRED_ATTRIBUTES]
    return g.nodes, defaults


def build_fsr_function(*, scan_block: int = SCAN_BLOCK) -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """The ``fsr.FocusScanRefine`` local function: one body for every node of the op.

    Returns ``(function, opset_imports)``; ``opset_imports`` is what a model holding the
    function needs (the body's ONNX opset and ``fsr`` version 1). ``scan_block`` (Scan
    candidates per matrix product) changes speed only, never a result.
    """
    if isinstance(scan_block, bool) or not isinstance(scan_block, int) or scan_block < 1:
        raise ValueError(f"scan_block must be an int >= 1, got {scan_block!r}")
    nodes, defaults = _build_body(scan_block)
    settings = fsr_body_settings(scan_block)
    function = helper.make_function(
        FSR_DOMAIN, FSR_OP, list(FSR_INPUTS), list(FSR_OUTPUTS), nodes,
        [helper.make_opsetid("", FSR_BODY_OPSET)],
        attributes=list(FSR_REQUIRED_ATTRIBUTES),
        attribute_protos=defaults,
        doc_string=(f"FocusScanRefine (shared/docs/fsr-op.md): attributes from the calling node, N and the batch "
                    f"from the input shapes.{_DOC_MARKER}{json.dumps(settings, sort_keys=True)}"),
    )
    _set_metadata(function, settings)
    opsets = [helper.make_opsetid("", FSR_BODY_OPSET), helper.make_opsetid(FSR_DOMAIN, FSR_OP_VERSION)]
    return function, opsets


def fsr_body_settings(scan_block: int = SCAN_BLOCK) -> dict[str, str]:
    """What a body built here is (the function's ``metadata_props``, without the prefix)."""
    return {
        "op": f"{FSR_DOMAIN}::{FSR_OP}",
        "op_version": str(FSR_OP_VERSION),
        "body_version": str(FSR_BODY_VERSION),
        "attributes": "from the calling node (ref_attr_name): " + ", ".join(FSR_ATTRIBUTES),
        "shapes": "dynamic: batch and N from the inputs; K = min(budget, N) or from keep_ratio",
        "relevance": "optional (an empty input name: r_hat = 1)",
        "token_dtypes": "float32, float16",
        "scan": f"Loop over blocks of {scan_block} candidates",
        "scan_block": str(scan_block),
        "opset": str(FSR_BODY_OPSET),
    }


def _set_metadata(function: onnx.FunctionProto, settings: dict[str, str]) -> None:
    del function.metadata_props[:]
    for key, value in settings.items():
        entry = function.metadata_props.add()
        entry.key, entry.value = _METADATA_PREFIX + key, str(value)


def fsr_function_settings(function: onnx.FunctionProto) -> dict[str, str]:
    """What a function body is, from its metadata (values as strings; {} when none)."""
    return {
        entry.key.removeprefix(_METADATA_PREFIX): entry.value
        for entry in function.metadata_props
        if entry.key.startswith(_METADATA_PREFIX)
    }


def restore_function_metadata(model: onnx.ModelProto) -> int:
    """Give every FocusScanRefine function of ``model`` that lost its ``metadata_props``
    (``gs.export_onnx`` drops them) the record kept in its doc string; returns how many."""
    restored = 0
    for function in model.functions:
        if (function.domain, function.name) != (FSR_DOMAIN, FSR_OP) or function.metadata_props:
            continue
        _, marker, record = function.doc_string.partition(_DOC_MARKER)
        if marker:
            _set_metadata(function, json.loads(record))
            restored += 1
    return restored


# --------------------------------------------------------------------------- checks


def check_fsr_node(attributes: dict, inputs: dict[str, tuple[int, list] | None], *, where: str = "") -> dict:
    """Check one FocusScanRefine node at graph-build time; return its normalised attributes.

    ``attributes``: the node's attributes; ``inputs``: input name -> (ONNX element type,
    shape as a list of ints / names / None), or None for an omitted optional input.
    Raises `FsrOpError` naming the op, the input or attribute and the rule.
    """
    at = f" ({where})" if where else ""
    try:
        attrs = check_attributes(**attributes)
    except FsrOpError as error:
        raise FsrOpError(f"{FSR_OP}{at}: {str(error).removeprefix(f'{FSR_OP}: ')}") from None
    for name in FSR_INPUTS:
        info = inputs.get(name)
        if info is None:
            if name in FSR_OPTIONAL_INPUTS:
                continue
            raise FsrOpError(f"{FSR_OP}{at}: input {name} is required")
        elem, shape = info
        rank = FSR_INPUT_RANKS[name]
        allowed = [_ONNX_TYPES[t] for t in FSR_INPUT_TYPES[name]]
        if elem and elem not in allowed:  # 0: the graph does not say
            type_name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
            raise FsrOpError(f"{FSR_OP}{at}: input {name} must be {' or '.join(FSR_INPUT_TYPES[name])}, "
                             f"got {type_name}")
        if shape is not None and len(shape) != rank:
            raise FsrOpError(f"{FSR_OP}{at}: input {name} must have rank {rank}, got shape {list(shape)}")
    tokens_shape = inputs["tokens"][1]
    if tokens_shape is not None and len(tokens_shape) != FSR_INPUT_RANKS["tokens"]:
        tokens_shape = None
    for name in FSR_INPUTS[1:]:
        info = inputs.get(name)
        if info is None or info[1] is None or tokens_shape is None:
            continue
        for axis, label in ((0, "B"), (1, "N")):
            a, b = tokens_shape[axis], info[1][axis]
            if isinstance(a, int) and isinstance(b, int) and a != b:
                raise FsrOpError(f"{FSR_OP}{at}: input {name} has {label} = {b} but tokens has {label} = {a} "
                                 f"(shapes {list(info[1])} and {list(tokens_shape)})")
    if inputs.get("relevance") is not None and 0 not in (inputs["relevance"][0], inputs["saliency"][0]) \
            and inputs["relevance"][0] != inputs["saliency"][0]:
        raise FsrOpError(f"{FSR_OP}{at}: input relevance must have the dtype of saliency "
                         f"({_TYPE_NAMES.get(inputs['saliency'][0])}), got {_TYPE_NAMES.get(inputs['relevance'][0])}")
    if tokens_shape is not None:
        n = tokens_shape[1]
        if isinstance(n, int) and n < 1:
            raise FsrOpError(f"{FSR_OP}{at}: input tokens has N = {n} tokens; the op needs N >= 1")
    return attrs


def _value_info(v: onnx.ValueInfoProto) -> tuple[int, list | None]:
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return t.elem_type, None
    return t.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def check_fsr_model(model: onnx.ModelProto) -> int:
    """Check every FocusScanRefine node of ``model`` (attributes, input ranks, dtypes, static
    N >= 1) after shape inference; returns how many it checked. Raises `FsrOpError`."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    count = 0
    for node in model.graph.node:
        if (node.domain, node.op_type) != (FSR_DOMAIN, FSR_OP):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute
                      if a.name in FSR_ATTRIBUTES}
        inputs = {}
        for name, value in zip(FSR_INPUTS, [*node.input, *[""] * len(FSR_INPUTS)]):
            inputs[name] = None if not value else (_value_info(infos[value]) if value in infos else (0, None))
        check_fsr_node(attributes, inputs, where=f"node {node.name!r}")
        count += 1
    return count


# --------------------------------------------------------------------------- one-node model


def make_fsr_model(
    *,
    budget: int,
    alpha: float | None = None,
    beta: float | None = None,
    rho: float | None = None,
    kappa: float | None = None,
    keep_ratio: float | None = None,
    num_tokens: int | str | None = None,
    token_dim: int | str = "token_dim",
    feature_dim: int | str = "feature_dim",
    has_relevance: bool = True,
    dtype="float32",
    feature_dtype="float32",
    score_dtype="float32",
    function: tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]] | None = None,
) -> onnx.ModelProto:
    """A one-node model ``fsr.FocusScanRefine`` with the function in ``model.functions``.

    Inputs ``tokens`` (dtype), ``features`` (feature_dtype), ``saliency`` and, with
    ``has_relevance``, ``relevance`` (score_dtype), batch dim ``"batch"``; ``num_tokens``
    None (default) makes N the dynamic dim ``"num_tokens"``. Without relevance the node's
    fourth input is ``""``. Outputs have K static when N is, else the dim ``"num_kept"``.
    ``function`` reuses a `build_fsr_function` result. IR version 10.
    """
    attributes = fsr_node_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa,
                                     keep_ratio=keep_ratio)
    fn, opsets = function if function is not None else build_fsr_function()
    n = "num_tokens" if num_tokens is None else num_tokens
    types = {"tokens": onnx_dtype(dtype), "features": onnx_dtype(feature_dtype), "saliency": onnx_dtype(score_dtype),
             "relevance": onnx_dtype(score_dtype)}
    shapes = {"tokens": ["batch", n, token_dim], "features": ["batch", n, feature_dim], "saliency": ["batch", n],
              "relevance": ["batch", n]}
    names = [name for name in FSR_INPUTS if has_relevance or name != "relevance"]
    check_fsr_node(attributes, {name: (types[name], shapes[name]) for name in names})
    k = kept_count(n, attributes["budget"], attributes["keep_ratio"]) if isinstance(n, int) else "num_kept"
    inputs = [helper.make_tensor_value_info(name, types[name], shapes[name]) for name in names]
    node = helper.make_node(FSR_OP, [name if name in names else "" for name in FSR_INPUTS], list(FSR_OUTPUTS),
                            name="focus_scan_refine", domain=FSR_DOMAIN, **attributes)
    outputs = [
        helper.make_tensor_value_info("pruned", types["tokens"], ["batch", k, token_dim]),
        helper.make_tensor_value_info("kept_indices", TensorProto.INT64, ["batch", k]),
    ]
    graph = helper.make_graph([node], "fsr_focus_scan_refine", inputs, outputs)
    return helper.make_model(graph, opset_imports=list(opsets), functions=[fn], ir_version=FSR_IR_VERSION,
                             producer_name="fsr-export")
