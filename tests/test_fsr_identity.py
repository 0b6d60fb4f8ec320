"""The FocusScanRefine identity is written once (pruning/focus_scan_refine.yaml) and every user
reads it: the ONNX function builder, the splice and plugin passes, the benchmark, and the
TensorRT plugin's creator (through the header its build generates). Nothing spells it again."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import helper

from fsr.pruning import fsr_identity
from fsr.pruning.fsr_identity import (
    FSR_ATTRIBUTE_DEFAULTS, FSR_ATTRIBUTES, FSR_DOMAIN, FSR_INPUTS, FSR_OP, FSR_OP_VERSION, FSR_OUTPUTS,
    IDENTITY_FILE,
)

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin"


def _yaml() -> dict:
    return yaml.safe_load(IDENTITY_FILE.read_text())


def test_python_names_come_from_the_yaml():
    doc = _yaml()
    [(version, spec)] = doc["versions"].items()
    assert (FSR_OP, FSR_DOMAIN, FSR_OP_VERSION) == (doc["name"], doc["domain"], int(version))
    assert list(FSR_INPUTS) == spec["inputs"] and list(FSR_OUTPUTS) == spec["outputs"]
    assert list(FSR_ATTRIBUTES) == spec["attributes"]
    assert FSR_ATTRIBUTE_DEFAULTS == {k: float(v) for k, v in spec["attribute_defaults"].items()}
    assert set(spec["attribute_defaults"]) | set(spec["attributes_required"]) == set(FSR_ATTRIBUTES)
    # The values the spec (shared/docs/fsr-op.md) gives.
    assert (FSR_DOMAIN, FSR_OP, FSR_OP_VERSION) == ("fsr", "FocusScanRefine", 1)
    assert FSR_ATTRIBUTE_DEFAULTS == {"alpha": 3.0, "beta": 1.0, "rho": 0.9, "kappa": 1.0, "keep_ratio": 0.0}


def test_function_splice_plugin_pass_and_bench_read_it():
    from fsr.bench import op as bench_op
    from fsr.graph_passes import fsr_to_plugin, isolate_fsr, splice_fsr
    from fsr.pruning.onnx_function import build_fsr_function

    fn, opsets = build_fsr_function()
    assert (fn.domain, fn.name, list(fn.input), list(fn.output)) == (FSR_DOMAIN, FSR_OP, list(FSR_INPUTS),
                                                                     list(FSR_OUTPUTS))
    assert list(fn.attribute) + [a.name for a in fn.attribute_proto] == list(FSR_ATTRIBUTES)
    assert {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto} == pytest.approx(FSR_ATTRIBUTE_DEFAULTS)
    assert (FSR_DOMAIN, FSR_OP_VERSION) in {(o.domain, o.version) for o in opsets}
    assert (splice_fsr.FSR_DOMAIN, splice_fsr.FSR_OP, isolate_fsr.FSR_OP) == (FSR_DOMAIN, FSR_OP, FSR_OP)
    assert (fsr_to_plugin.PLUGIN_NAME, fsr_to_plugin.PLUGIN_NAMESPACE, fsr_to_plugin.PLUGIN_VERSION) == \
        (FSR_OP, FSR_DOMAIN, str(FSR_OP_VERSION))
    assert bench_op._float_attributes() == tuple(a for a in FSR_ATTRIBUTES if a != "budget")


_OP_LITERALS = re.compile(rf'"({FSR_OP}|{FSR_DOMAIN})"')
_ATTRIBUTE_LITERALS = re.compile(r'"(' + "|".join(re.escape(a) for a in FSR_ATTRIBUTES) + r')"')


def _code(path: str) -> str:
    """The file without comments and docstrings (they may mention the names)."""
    code = re.sub(r'"""[\s\S]*?"""', "", (ROOT / path).read_text())
    marker = "#" if path.endswith(".py") else "//"
    return "\n".join(line.split(marker, 1)[0] for line in code.splitlines())


@pytest.mark.parametrize("path", [
    "pruning/onnx_function.py", "pruning/fsr_fixed.py", "pruning/fsr_reference.py", "pruning/_numerics.py",
    "graph_passes/splice_fsr.py", "graph_passes/isolate_fsr.py", "graph_passes/fsr_to_plugin.py",
    "engines/plugin_graph.py", "bench/op.py", "plugin/focusScanRefinePlugin.cpp", "plugin/focusScanRefinePlugin.h",
])
def test_nothing_spells_the_identity_again(path):
    """No string literal names the op or its domain; the plugin glue names no attribute either
    (its creator's fields, defaults and ranges come from the generated header)."""
    code = _code(path)
    found = _OP_LITERALS.findall(code)
    if path == "bench/op.py":  # "fsr" is also the pruning method's name there
        found = [x for x in found if x != FSR_DOMAIN]
    assert not found, f"{path} spells the op's name or domain"
    if path.startswith("plugin/"):
        assert not _ATTRIBUTE_LITERALS.findall(code), f"{path} spells attribute names"


def test_python_defaults_are_not_repeated():
    """Public callables leave the optional attributes at None: the identity file's defaults apply."""
    import inspect

    from fsr.graph_passes import splice_focus_scan_refine
    from fsr.pruning import FocusScanRefineFixed, focus_scan_refine_reference
    from fsr.pruning.onnx_function import fsr_node_attributes, make_fsr_model

    for fn in (splice_focus_scan_refine, FocusScanRefineFixed.__init__, focus_scan_refine_reference,
               fsr_node_attributes, make_fsr_model):
        params = inspect.signature(fn).parameters
        for name in FSR_ATTRIBUTE_DEFAULTS:
            assert params[name].default is None, (fn.__qualname__, name)
    attrs = fsr_node_attributes(budget=2)
    assert {k: v for k, v in attrs.items() if k != "budget"} == pytest.approx(FSR_ATTRIBUTE_DEFAULTS)


def _generate(tmp_path) -> Path:
    out = tmp_path / "focusScanRefineIdentity.h"
    subprocess.run([sys.executable, str(PLUGIN / "generate_identity_header.py"), "--yaml", str(IDENTITY_FILE),
                    "--out", str(out)], check=True)
    return out


def test_plugin_header_carries_the_yaml(tmp_path):
    """The generated header, compiled, reports exactly the YAML's names, defaults and ranges."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    header = _generate(tmp_path)
    program = tmp_path / "dump.cpp"
    program.write_text('''#include "focusScanRefineIdentity.h"
#include <cstdio>
#include <cmath>
using namespace fsr::plugin::identity;
static void number(double x) { if (std::isinf(x)) std::printf("\\"%s\\"", x > 0 ? "pinf" : "ninf"); else std::printf("%.17g", x); }
int main() {
    std::printf("{\\"name\\": \\"%s\\", \\"version\\": \\"%s\\", \\"namespace\\": \\"%s\\", \\"inputs\\": [%d, %d], "
                "\\"outputs\\": %d, \\"max_tokens\\": %lld, \\"topk\\": %lld, \\"attributes\\": [",
                kPluginName, kPluginVersion, kPluginNamespace, kMinInputs, kMaxInputs, kNbOutputs,
                (long long) kPluginMaxTokens, (long long) kTensorrtTopkMaxK);
    for (int i = 0; i < kNbAttributes; ++i) {
        AttributeSpec const& a = kAttributes[i];
        std::printf("%s{\\"name\\": \\"%s\\", \\"int\\": %d, \\"required\\": %d, \\"default\\": ", i ? ", " : "", a.name,
                    a.isInteger, a.required);
        number(a.defaultValue); std::printf(", \\"min\\": "); number(a.min);
        std::printf(", \\"min_in\\": %d, \\"max\\": ", a.minInclusive); number(a.max);
        std::printf(", \\"max_in\\": %d, \\"finite\\": %d}", a.maxInclusive, a.finite);
    }
    std::printf("]}\\n");
    static_assert(kKeepRatio == 5 && kBudget == 0, "attribute order");
}
''')
    binary = tmp_path / "dump"
    subprocess.run([compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(tmp_path), str(program), "-o",
                    str(binary)], check=True)
    dumped = json.loads(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout)
    spec = fsr_identity.SPEC
    assert (dumped["name"], dumped["version"], dumped["namespace"]) == (FSR_OP, str(FSR_OP_VERSION), FSR_DOMAIN)
    assert dumped["inputs"] == [len(FSR_INPUTS) - len(spec["optional_inputs"]), len(FSR_INPUTS)]
    assert dumped["outputs"] == len(FSR_OUTPUTS)
    assert dumped["max_tokens"] == fsr_identity.PLUGIN_MAX_TOKENS
    assert dumped["topk"] == fsr_identity.TENSORRT_TOPK_MAX_K
    assert [a["name"] for a in dumped["attributes"]] == list(FSR_ATTRIBUTES)
    for a in dumped["attributes"]:
        (lo, lo_in), (hi, hi_in), finite = fsr_identity.ATTRIBUTE_RANGES[a["name"]]
        as_number = lambda x: {"pinf": float("inf"), "ninf": float("-inf")}.get(x, x)  # noqa: E731
        assert (as_number(a["min"]), bool(a["min_in"]), as_number(a["max"]), bool(a["max_in"]), bool(a["finite"])) \
            == (lo, lo_in, hi, hi_in, finite), a
        assert bool(a["int"]) == fsr_identity.FSR_ATTRIBUTE_TYPES[a["name"]].startswith("int")
        assert bool(a["required"]) == (a["name"] in fsr_identity.FSR_REQUIRED_ATTRIBUTES)
        if not a["required"]:
            assert a["default"] == FSR_ATTRIBUTE_DEFAULTS[a["name"]]


def test_plugin_build_generates_the_header():
    """CMake generates the header from the YAML (no copy of the identity in plugin/)."""
    cmake = (PLUGIN / "CMakeLists.txt").read_text()
    assert "generate_identity_header.py" in cmake and "focus_scan_refine.yaml" in cmake
    assert not (PLUGIN / "focusScanRefineIdentity.h").exists()
    assert '#include "focusScanRefineIdentity.h"' in (PLUGIN / "focusScanRefinePlugin.h").read_text()


def test_exported_node_carries_every_attribute(tmp_path):
    """A spliced node writes every attribute the identity lists (a plugin reads them all)."""
    from fsr.pruning.onnx_function import make_fsr_model

    node = make_fsr_model(budget=3).graph.node[0]
    assert sorted(a.name for a in node.attribute) == sorted(FSR_ATTRIBUTES)
    assert (node.domain, node.op_type) == (FSR_DOMAIN, FSR_OP)
    onnx.checker.check_model(make_fsr_model(budget=3), full_check=True)
