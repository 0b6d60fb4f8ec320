"""The tree's structure, read from the sources (``ast``): imports point downwards, a method is
asked and never named in a branch, a family's geometry stays in ``models/``, and the
command-line tools start without the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: package folder -> layer. A module may import its own layer and the layers below; export and
#: engines are peers that do not import each other, and so are compare and bench.
LAYERS = {"fsr": 0, "pruning": 1, "graph_passes": 1, "models": 2, "export": 3, "engines": 3, "runtime": 4,
          "compare": 5, "bench": 5}
PEERS = [{"export", "engines"}, {"compare", "bench"}]
#: family-geometry numbers (tokens per image, image size, CLIP text context, NeXT's tokens and size);
#: patch 14 and grid 24 are too common as plain numbers to ban, the config-field check covers them
GEOMETRY = {576, 336, 77, 2880, 672}
#: Hugging Face config fields only the model specs read
CONFIG_FIELDS = {"vision_config", "text_config", "num_key_value_heads", "num_attention_heads", "num_hidden_layers",
                 "vision_feature_layer", "vision_feature_select_strategy"}
#: operator sizes (not a model's geometry) in the FocusScanRefine op's own test cases and micro-benchmarks
GEOMETRY_EXCEPTIONS = {"pruning/testing.py", "bench/op.py", "bench/gpu_check.py"}
#: the FocusScanRefine op's own micro-benchmark (``fsr-bench op``) picks FSR exports: FSR by definition
METHOD_NAME_EXCEPTIONS = {"bench/op.py"}


def modules():
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def package_of(name: str) -> str | None:
    """``fsr.models.llava`` -> ``models``; ``fsr.errors`` -> ``fsr``."""
    parts = name.split(".")
    if parts[0] != "fsr":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "fsr"


def imports(tree: ast.AST, rel: str):
    """Every ``fsr`` module a module imports (at the top or inside functions)."""
    package = rel.split("/")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                yield f"fsr.{package}.{node.module or ''}".rstrip(".")
            elif node.module:
                yield node.module
                yield from (f"{node.module}.{a.name}" for a in node.names)


def test_imports_point_downwards():
    wrong = []
    for rel, tree in modules():
        source = rel.split("/")[0] if "/" in rel else "fsr"
        for name in imports(tree, rel):
            target = package_of(name)
            if target is None or target == source:
                continue
            if LAYERS[target] > LAYERS[source] or {source, target} in PEERS:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "imports that point upwards or sideways:\n" + "\n".join(sorted(set(wrong)))


def test_compare_fidelity_and_run_do_not_import_each_other():
    """``run`` runs the fidelity report; the report knows nothing of ``run`` (no import cycle)."""
    trees = dict(modules())
    assert not [n for n in imports(trees["compare/fidelity.py"], "compare/fidelity.py")
                if n.startswith("fsr.compare.run")]


def _str_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_str_constants(e) for e in node.elts)) if node.elts else set()
    return set()


def test_no_method_branches_outside_the_registry():
    """``method == "fsr"``, ``manifest["method"] != "none"``, ``m.name in ("fsr", ...)``: a method is
    asked what it does (``fsr.pruning.methods``), never recognised by its name."""
    from fsr.pruning.methods import method_names

    names = set(method_names())
    found = []
    for rel, tree in modules():
        if rel.startswith("pruning/") or rel in METHOD_NAME_EXCEPTIONS:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            mentions = any("method" in ast.unparse(o).lower() for o in operands)
            constants = set().union(*(_str_constants(o) for o in operands))
            if mentions and constants & names:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "method-name branches outside pruning/:\n" + "\n".join(found)


def test_family_geometry_stays_in_models():
    from fsr.models import FAMILIES

    family_modules = {e.module for e in FAMILIES.values()}
    found = []
    for rel, tree in modules():
        if rel.startswith("models/"):
            continue
        found += [f"{rel} imports the family module {n}" for n in imports(tree, rel) if n in family_modules]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and type(node.value) is int and node.value in GEOMETRY
                    and rel not in GEOMETRY_EXCEPTIONS):
                found.append(f"{rel}:{node.lineno}: the number {node.value}")
            if isinstance(node, ast.Attribute) and node.attr in CONFIG_FIELDS:
                found.append(f"{rel}:{node.lineno}: reads the model config's {node.attr}")
    assert not found, "family geometry outside models/:\n" + "\n".join(found)


def test_the_catalogue_matches_the_family_modules():
    from fsr.models import FAMILIES, get_spec

    for name, entry in FAMILIES.items():
        spec = get_spec(name)
        assert spec.name == name and tuple(spec.presets) == entry.presets, name
        assert entry.default_preset in spec.presets


def test_command_line_tools_start_without_heavy_libraries():
    """Importing the five CLIs and both registries loads no torch, transformers, onnx(runtime) or TensorRT,
    so ``--help`` and argument errors are quick (the commands import those after checking arguments)."""
    code = ("import sys\n"
            "import fsr.export.cli, fsr.runtime.cli, fsr.engines.cli, fsr.compare.cli, fsr.bench.cli\n"
            "import fsr.models, fsr.pruning.methods, fsr.manifest, fsr.settings\n"
            "fsr.pruning.methods.methods()\n"
            "heavy = ('torch', 'transformers', 'onnx', 'onnxruntime', 'onnx_graphsurgeon', 'tensorrt', "
            "'tensorrt_rtx', 'polygraphy', 'matplotlib')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_every_package_folder_is_known(folder):
    assert (ROOT / folder).is_dir()
