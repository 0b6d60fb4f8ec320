"""FocusScanRefine as an ONNX local function (domain ``fsr``, op ``FocusScanRefine``).

`build_fsr_function` exports `FocusScanRefineFixed` for one setting (dynamic batch,
static N, D, F) and turns the exported graph into a ``FunctionProto``:

- signature exactly the spec's: inputs ``tokens, features, saliency, relevance``
  (always four; without relevance the body ignores the fourth, so a node may pass
  ``""``), outputs ``pruned, kept_indices``, attributes ``budget, alpha, beta, rho, kappa``;
- **the body is specialised**: it computes the op for the attribute values, token count
  and dims it was built for, whatever a calling node's attributes say. The attributes
  are declared so a node can carry them (TensorRT plugins read them); the values a body
  was built for are in its ``metadata_props`` (see `fsr_function_settings`);
- ``features``, ``saliency``, ``relevance`` are cast to float32 at the top of the body,
  so any float dtype works for them; ``tokens`` must have the dtype the body was built for;
- initializers become Constant nodes, nested local functions are inlined.

`make_fsr_model` wraps one function in a standalone one-node model for tests.
"""

from __future__ import annotations


import torch
import onnx
import onnx.inliner
from onnx import TensorProto, helper

from fsr.onnx_io import quiet_exporter

from ._numerics import check_attributes
from .fsr_fixed import FocusScanRefineFixed

FSR_DOMAIN = "fsr"
FSR_OP = "FocusScanRefine"
FSR_OP_VERSION = 1
#: ONNX (default domain) opset of the function body.
FSR_BODY_OPSET = 18
#: IR version of models made here (onnxruntime 1.31 rejects newer ones).
FSR_IR_VERSION = 10
FSR_INPUTS = ("tokens", "features", "saliency", "relevance")
FSR_OUTPUTS = ("pruned", "kept_indices")
FSR_ATTRIBUTES = ("budget", "alpha", "beta", "rho", "kappa")

_METADATA_PREFIX = "fsr."
_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
}


def fsr_node_attributes(*, budget, alpha=3.0, beta=1.0, rho=0.9, kappa=1.0) -> dict:
    """The attribute dict of a FocusScanRefine node (validated, python int / floats)."""
    check_attributes(budget, alpha, beta, rho, kappa)
    return {
        "budget": int(budget),
        "alpha": float(alpha),
        "beta": float(beta),
        "rho": float(rho),
        "kappa": float(kappa),
    }


def onnx_dtype(dtype: torch.dtype) -> int:
    """ONNX TensorProto element type of a torch float dtype."""
    try:
        return _TORCH_TO_ONNX[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(_TORCH_TO_ONNX)}") from None


def export_fsr_fixed(
    *,
    budget: int,
    alpha: float = 3.0,
    beta: float = 1.0,
    rho: float = 0.9,
    kappa: float = 1.0,
    num_tokens: int,
    token_dim: int,
    feature_dim: int,
    has_relevance: bool = True,
    dtype: torch.dtype = torch.float32,
) -> onnx.ModelProto:
    """Export `FocusScanRefineFixed` with ``torch.onnx.export(dynamo=True)``, batch dynamic.

    Graph inputs ``tokens [batch, N, D]`` (dtype), ``features [batch, N, F]``,
    ``saliency``, ``relevance`` (float32, relevance only if ``has_relevance``).
    """
    attributes = fsr_node_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa)
    for name, value in (("num_tokens", num_tokens), ("token_dim", token_dim), ("feature_dim", feature_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    onnx_dtype(dtype)
    module = FocusScanRefineFixed(**attributes).eval()
    # Batch 2: a batch-1 example lets the exporter specialise the batch to 1.
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(2, num_tokens, token_dim, generator=gen).to(dtype),
        torch.randn(2, num_tokens, feature_dim, generator=gen),
        torch.rand(2, num_tokens, generator=gen),
    ]
    if has_relevance:
        args.append(torch.rand(2, num_tokens, generator=gen))
    batch = torch.export.Dim("batch", min=1)

    with quiet_exporter():  # the exporter's per-step banners and harmless warnings
        program = torch.onnx.export(
            module,
            tuple(args),
            dynamo=True,
            opset_version=FSR_BODY_OPSET,
            input_names=list(FSR_INPUTS[: len(args)]),
            output_names=list(FSR_OUTPUTS),
            dynamic_shapes=tuple({0: batch} for _ in args),
            verbose=False,
        )
    return program.model_proto


def build_fsr_function(
    *,
    budget: int,
    alpha: float = 3.0,
    beta: float = 1.0,
    rho: float = 0.9,
    kappa: float = 1.0,
    num_tokens: int,
    token_dim: int,
    feature_dim: int,
    has_relevance: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]]:
    """Build the ``fsr.FocusScanRefine`` local function for one setting.

    Returns ``(function, opset_imports)``; ``opset_imports`` is what a model holding the
    function needs (the body's ONNX opset and ``fsr`` version 1). The body is
    specialised to these arguments (see the module docstring).
    """
    model = export_fsr_fixed(
        budget=budget,
        alpha=alpha,
        beta=beta,
        rho=rho,
        kappa=kappa,
        num_tokens=num_tokens,
        token_dim=token_dim,
        feature_dim=feature_dim,
        has_relevance=has_relevance,
        dtype=dtype,
    )
    settings = _body_settings(
        fsr_node_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa),
        num_tokens=num_tokens, token_dim=token_dim, feature_dim=feature_dim,
        has_relevance=has_relevance, dtype=dtype,
    )
    function = function_from_graph(model, settings=settings)
    opsets = [helper.make_opsetid(o.domain, o.version) for o in function.opset_import]
    opsets.append(helper.make_opsetid(FSR_DOMAIN, FSR_OP_VERSION))
    return function, opsets


def _body_settings(attributes: dict, *, num_tokens, token_dim, feature_dim, has_relevance, dtype) -> dict:
    """What a function body is specialised to: recorded in its metadata, checked on reuse."""
    return {
        **attributes,
        "num_tokens": num_tokens,
        "token_dim": token_dim,
        "feature_dim": feature_dim,
        "has_relevance": bool(has_relevance),
        "dtype": str(dtype).removeprefix("torch."),
    }


def function_from_graph(model: onnx.ModelProto, *, settings: dict | None = None) -> onnx.FunctionProto:
    """Turn an exported FSR model (inputs/outputs named as in the spec) into the local function."""
    model = onnx.inliner.inline_local_functions(model)
    graph = model.graph
    graph_inputs = [i.name for i in graph.input]
    graph_outputs = [o.name for o in graph.output]
    if graph_inputs != list(FSR_INPUTS[: len(graph_inputs)]) or len(graph_inputs) < 3:
        raise ValueError(f"unexpected graph inputs {graph_inputs}, expected a prefix of {FSR_INPUTS}")
    if graph_outputs != list(FSR_OUTPUTS):
        raise ValueError(f"unexpected graph outputs {graph_outputs}, expected {list(FSR_OUTPUTS)}")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ValueError(f"node {node.name} ({node.op_type}) has a subgraph; not supported")

    used = {name for node in graph.node for name in (*node.input, *node.output)}
    used.update(init.name for init in graph.initializer)
    used.update(graph_inputs)
    used.update(node.name for node in graph.node)  # node and value names kept apart anyway
    fresh = _NameSource(used)

    nodes: list[onnx.NodeProto] = []
    # Score / feature inputs: cast to float32 once, so the body takes any float dtype.
    renamed = {}
    referenced = {name for node in graph.node for name in node.input}
    for name in ("features", "saliency", "relevance"):
        if name in referenced:
            renamed[name] = fresh(f"{name}_f32")
            nodes.append(
                helper.make_node(
                    "Cast", [name], [renamed[name]], name=fresh(f"cast_{name}"), to=TensorProto.FLOAT
                )
            )
    # Function bodies hold no initializers: constants become Constant nodes.
    for init in graph.initializer:
        nodes.append(helper.make_node("Constant", [], [init.name], name=fresh(f"const_{init.name}"), value=init))
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.metadata_props[:]
        copy.doc_string = ""
        for k, name in enumerate(copy.input):
            if name in renamed:
                copy.input[k] = renamed[name]
        if not copy.name:
            copy.name = fresh(copy.op_type.lower())
        nodes.append(copy)

    produced = {name for node in nodes for name in node.output}
    missing = [name for name in graph_outputs if name not in produced]
    if missing:
        raise ValueError(f"outputs {missing} are not computed by any node of the exported graph")

    domains = {node.domain for node in nodes}
    versions = {o.domain: o.version for o in model.opset_import}
    opsets = [helper.make_opsetid(d, versions.get(d, FSR_BODY_OPSET)) for d in sorted(domains)]
    doc = (
        "FocusScanRefine (shared/docs/fsr-op.md). Body specialised to "
        + ", ".join(f"{k}={v}" for k, v in (settings or {}).items())
    )
    function = helper.make_function(
        FSR_DOMAIN,
        FSR_OP,
        list(FSR_INPUTS),
        list(FSR_OUTPUTS),
        nodes,
        opsets,
        attributes=list(FSR_ATTRIBUTES),
        doc_string=doc,
    )
    for key, value in (settings or {}).items():
        entry = function.metadata_props.add()
        entry.key = _METADATA_PREFIX + key
        entry.value = str(value)
    return function


def fsr_function_settings(function: onnx.FunctionProto) -> dict[str, str]:
    """The settings a function body was built for, from its metadata (values as strings)."""
    return {
        entry.key.removeprefix(_METADATA_PREFIX): entry.value
        for entry in function.metadata_props
        if entry.key.startswith(_METADATA_PREFIX)
    }


def make_fsr_model(
    *,
    budget: int,
    alpha: float = 3.0,
    beta: float = 1.0,
    rho: float = 0.9,
    kappa: float = 1.0,
    num_tokens: int,
    token_dim: int,
    feature_dim: int,
    has_relevance: bool = True,
    dtype: torch.dtype = torch.float32,
    feature_dtype: torch.dtype = torch.float32,
    score_dtype: torch.dtype = torch.float32,
    function: tuple[onnx.FunctionProto, list[onnx.OperatorSetIdProto]] | None = None,
) -> onnx.ModelProto:
    """A one-node model ``fsr.FocusScanRefine`` with the function in ``model.functions``.

    Inputs ``tokens`` (dtype), ``features`` (feature_dtype), ``saliency`` and, with
    ``has_relevance``, ``relevance`` (score_dtype), batch dim ``"batch"``. Without
    relevance the node's fourth input is ``""``. ``function`` reuses the result of
    `build_fsr_function` (it must have been built for the same settings); otherwise one
    is built. IR version 10.
    """
    attributes = fsr_node_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa)
    if function is None:
        function = build_fsr_function(
            **attributes,
            num_tokens=num_tokens,
            token_dim=token_dim,
            feature_dim=feature_dim,
            has_relevance=has_relevance,
            dtype=dtype,
        )
    fn, opsets = function
    expected = {
        k: str(v)
        for k, v in _body_settings(
            attributes, num_tokens=num_tokens, token_dim=token_dim, feature_dim=feature_dim,
            has_relevance=has_relevance, dtype=dtype,
        ).items()
    }
    built_for = fsr_function_settings(fn)
    mismatched = {k: (built_for.get(k), v) for k, v in expected.items() if built_for.get(k) != v}
    if built_for and mismatched:
        raise ValueError(f"function was built for other settings: {mismatched} (built, asked)")

    k = min(budget, num_tokens)
    inputs = [
        helper.make_tensor_value_info("tokens", onnx_dtype(dtype), ["batch", num_tokens, token_dim]),
        helper.make_tensor_value_info("features", onnx_dtype(feature_dtype), ["batch", num_tokens, feature_dim]),
        helper.make_tensor_value_info("saliency", onnx_dtype(score_dtype), ["batch", num_tokens]),
    ]
    if has_relevance:
        inputs.append(helper.make_tensor_value_info("relevance", onnx_dtype(score_dtype), ["batch", num_tokens]))
    node = helper.make_node(
        FSR_OP,
        ["tokens", "features", "saliency", "relevance" if has_relevance else ""],
        list(FSR_OUTPUTS),
        name="focus_scan_refine",
        domain=FSR_DOMAIN,
        **attributes,
    )
    outputs = [
        helper.make_tensor_value_info("pruned", onnx_dtype(dtype), ["batch", k, token_dim]),
        helper.make_tensor_value_info("kept_indices", TensorProto.INT64, ["batch", k]),
    ]
    graph = helper.make_graph([node], "fsr_focus_scan_refine", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=list(opsets),
        functions=[fn],
        ir_version=FSR_IR_VERSION,
        producer_name="fsr-export",
    )
    return model


class _NameSource:
    """Fresh value / node names that collide with nothing already used."""

    def __init__(self, used):
        self._used = set(used)

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name
