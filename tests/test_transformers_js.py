"""``fsr-export --format transformers.js``: one folder our commands read as an export and
Hugging Face Transformers.js runs as a model, with no code of ours; ``--relevance none``.

The Node tests install ``@huggingface/transformers`` (pinned) once into a cache folder
(``$FSR_NPM_CACHE``, default ``~/.cache/fsr-export/npm``) with ``ONNXRUNTIME_NODE_INSTALL=skip``
(onnxruntime-node's CPU binaries are bundled; the GPU ones would be downloaded) and skip,
saying why, where Node, npm or the npm registry is not available. They compare greedy token
ids and kept indices with our pipeline (what ``fsr-run`` runs) on 336x336 images, where
both sides' pixels are the same (no resizing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from fsr.export import ExportSettings, describe, export_model
from fsr.export.transformers_js import LayoutError
from fsr.manifest import Manifest, read_manifest
from fsr.models import get_spec, load_model
from fsr.pruning.methods import get_method, method_names
from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import ReferencePipeline

TRANSFORMERS_JS = "4.3.2"
SCRIPT = Path(__file__).parent / "js" / "run_export.mjs"
MAX_NEW = 8
PROMPTS = ["What is in the picture?", "Describe the image in detail, please."]
TJS = "transformers.js"


# ----------------------------------------------------------------------------- fixtures


def _export(tmp_path_factory, name: str, method: str, dtype: str = "fp32", **options) -> Path:
    out = tmp_path_factory.mktemp("tjs") / name
    export_model(load_model("tiny"), out, ExportSettings(method, dtype=dtype, format=TJS, **options))
    return out


@pytest.fixture(scope="module")
def tjs_none(tmp_path_factory):
    return _export(tmp_path_factory, "none", "none")


@pytest.fixture(scope="module")
def tjs_fsr(tmp_path_factory):
    return _export(tmp_path_factory, "fsr64", "fsr", budget=64, relevance="none")


@pytest.fixture(scope="module")
def tjs_none16(tmp_path_factory):
    return _export(tmp_path_factory, "none16", "none", dtype="fp16")


@pytest.fixture(scope="module")
def tjs_fsr16(tmp_path_factory):
    return _export(tmp_path_factory, "fsr64-16", "fsr", dtype="fp16", budget=64, relevance="none")


EXPORTS = ["tjs_none", "tjs_fsr", "tjs_none16", "tjs_fsr16"]


@pytest.fixture(scope="module")
def images336(tmp_path_factory, images):
    """336x336 images (no resize on either side), structured so that saliency is not flat."""
    folder = tmp_path_factory.mktemp("images336")
    paths = [images[1]]  # conftest's 336x336 image
    y, x = np.mgrid[0:336, 0:336]
    base = np.stack([np.cos(x / 13.0) * np.sin(y / 9.0), np.sin((x - y) / 17.0), np.cos((x * y) / 4000.0)], -1)
    pixels = ((base * 0.45 + 0.5).clip(0, 1) * 255).astype("uint8")
    Image.fromarray(pixels).save(folder / "pattern.png")
    paths.append(folder / "pattern.png")
    return paths


def _npm_cache() -> Path:
    base = os.environ.get("FSR_NPM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "fsr-export" / "npm") / f"transformers-{TRANSFORMERS_JS}"


def _installed(folder: Path) -> bool:
    package = folder / "node_modules" / "@huggingface" / "transformers" / "package.json"
    try:
        return json.loads(package.read_text())["version"] == TRANSFORMERS_JS
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="session")
def transformers_js():
    """A folder where ``@huggingface/transformers@4.3.2`` is installed (once, then cached)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are needed to run an export with Transformers.js (not installed here)")
    cache = _npm_cache()
    if _installed(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    (tmp / "package.json").write_text('{"private": true}\n')
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}  # the CPU binaries are bundled
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--fetch-retries=1",
                               f"@huggingface/transformers@{TRANSFORMERS_JS}"],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not _installed(tmp):
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"npm could not install @huggingface/transformers@{TRANSFORMERS_JS} (registry unreachable?): "
                        + " | ".join(tail))
        try:
            tmp.rename(cache)
        except OSError:  # another run installed it meanwhile
            if not _installed(cache):
                raise
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install @huggingface/transformers@{TRANSFORMERS_JS} took over 15 minutes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def run_node(package: Path, export: Path, pairs: list[tuple[Path, str]], pixels: Path | None = None) -> list[dict]:
    args = ["node", str(SCRIPT), str(package), str(export), str(MAX_NEW)]
    for image, prompt in pairs:
        args += [str(image), prompt]
    env = {**os.environ, **({"FSR_TJS_PIXELS": str(pixels)} if pixels else {})}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"Transformers.js failed on {export}:\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _collapse(ids: list[int], image_token: int) -> list[int]:
    """A prompt whose image token was expanded to K copies, with one again."""
    return [t for i, t in enumerate(ids) if t != image_token or i == 0 or ids[i - 1] != image_token]


# ----------------------------------------------------------------------------- the layout (no Node)


@pytest.mark.parametrize("name", EXPORTS)
def test_layout_is_what_transformers_js_reads(name, request):
    export = request.getfixturevalue(name)
    manifest = read_manifest(export, verify=True)
    fp16 = name.endswith("16")
    suffix = "_fp16" if fp16 else ""
    assert manifest.layout == TJS
    assert {n: e.file for n, e in manifest.graphs.items()} == {
        "vision": f"onnx/vision_encoder{suffix}.onnx", "embed": f"onnx/embed_tokens{suffix}.onnx",
        "decoder": f"onnx/decoder_model_merged{suffix}.onnx"}
    assert not list(export.glob("*.onnx")), "no graph of the native layout is left at the top level"

    vision = manifest.graphs["vision"]
    assert vision.input_names == ["pixel_values"]  # no instruction_embeds: Transformers.js feeds pixels only
    assert vision.inputs[0].dtype == "float32"  # an fp16 vision encoder casts inside
    assert vision.output_names[0] == "image_features" and vision.aliases == {"image_features": "image_tokens"}
    kept = manifest.image.kept_image_tokens
    assert vision.outputs[0].shape == ["batch_size", kept, manifest.llm.hidden_size]
    assert vision.outputs[0].dtype == ("float16" if fp16 else "float32")
    assert kept == (64 if "fsr" in name else manifest.image.num_image_tokens)

    decoder = manifest.graphs["decoder"]
    past = [t for t in decoder.inputs if t.name.startswith("past_key_values.")]
    assert len(past) == 2 * manifest.llm.num_layers and all(t.shape[0] == "batch_size" for t in past)
    assert decoder.input_names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert decoder.output_names[0] == "logits"

    config = json.loads((export / "config.json").read_text())
    # graphs with a weight file (the decoder's, shared with its ONNX Runtime form) are named for Transformers.js
    external = {p.name[:-len("_data")]: 1 for p in (export / "onnx").glob("*.onnx_data")}
    assert external == ({f"decoder_model_merged{suffix}.onnx": 1} if external else {})
    assert config["transformers.js_config"] == {"dtype": manifest.dtype,
                                                **({"use_external_data_format": external} if external else {})}
    assert config["model_type"] == "llava"
    processor = json.loads((export / "processor_config.json").read_text())
    size = manifest.vision.image_size
    assert (size // processor["patch_size"]) ** 2 + processor["num_additional_image_tokens"] == kept
    preprocessor = json.loads((export / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "LlavaProcessor" and preprocessor["crop_size"]["height"] == size
    tokenizer = json.loads((export / "tokenizer_config.json").read_text())
    assert "<image>" in tokenizer["chat_template"]
    model = onnx.load(str(export / vision.file))
    readers = [n.op_type for n in model.graph.node if "pixel_values" in n.input]
    assert readers == ["Cast"] if fp16 else "Cast" not in readers


def test_our_pipeline_reads_it_as_a_native_export(tjs_none, export_none, images, prompts):
    """Same model, same graphs, another layout: fsr-run's tokens are the native export's."""
    with Pipeline(tjs_none) as tjs, Pipeline(export_none) as native:
        got = tjs.generate(images[:2], prompts[:2], max_new_tokens=MAX_NEW)
        want = native.generate(images[:2], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_relevance_none_matches_the_reference(tjs_fsr, images, prompts):
    """FSR with the relevance term omitted (phi = s_hat^beta) in the graph = the PyTorch reference pipeline."""
    manifest = read_manifest(tjs_fsr)
    assert manifest.method.settings["relevance"] == "none" and manifest.relevance.source is None
    assert "text_encoder" not in manifest.graphs
    reference = ReferencePipeline.from_export(tjs_fsr)
    with Pipeline(tjs_fsr) as pipe:
        got = pipe.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    want = reference.generate(images[1:3], prompts[:2], max_new_tokens=MAX_NEW)
    assert [g.kept_indices for g in got] == [w.kept_indices for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("method, options, relevance, inputs", [
    ("none", {}, None, ["pixel_values"]),
    ("fsr", {"relevance": "none"}, None, ["pixel_values"]),
    ("fsr", {"relevance": "llm"}, "llm-embedding-mean", ["pixel_values", "instruction_embeds"]),
])
def test_vision_inputs_in_the_native_format(tiny_model, method, options, relevance, inputs):
    """The unpruned and the relevance-none vision graphs take pixels only, in every format."""
    manifest = describe(tiny_model, ExportSettings(method, **options))
    assert manifest.layout == "fsr" and manifest.relevance.source == relevance
    assert ("text_encoder" in manifest.graphs) is False
    assert get_spec("llava").vision_graph(tiny_model, manifest).input_names == inputs


@pytest.mark.parametrize("options, expected", [
    ({"method": "fsr"}, "--relevance none"),
    ({"method": "fsr", "relevance": "clip"}, "--relevance none"),
    ({"method": "none", "decoder_splits": (1,)}, "decoder segments"),
])
def test_what_transformers_js_cannot_run_is_refused_before_tracing(tiny_model, tmp_path, options, expected):
    with pytest.raises(LayoutError, match=expected):
        export_model(tiny_model, tmp_path / "out", ExportSettings(format=TJS, **options))
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown export format 'onnx'.*native, transformers.js"):
        ExportSettings("none", format="onnx")


def test_cli_refuses_relevance_for_transformers_js(tmp_path):
    from fsr.cli import run_app
    from fsr.export.cli import app

    code = run_app(app, ["llava", "--format", "transformers.js", "-o", str(tmp_path / "x")], prog_name="fsr-export")
    assert code == 2 and not (tmp_path / "x").exists()


def test_format_2_manifests_without_aliases_still_read(export_none):
    data = json.loads((export_none / "manifest.json").read_text())
    for entry in data["graphs"].values():
        entry.pop("aliases", None)
    manifest = Manifest.from_json(data)
    assert manifest.layout == "fsr" and manifest.graphs["vision"].aliases == {}


# ----------------------------------------------------------------------------- Transformers.js in Node


@pytest.mark.parametrize("name", EXPORTS)
def test_transformers_js_generates_what_fsr_run_generates(name, request, transformers_js, images336, tmp_path):
    """Greedy token ids of Transformers.js (Node, the export as it is) = our pipeline's on the same export;
    the kept indices its vision session returns = ours; its pixels = ours."""
    export = request.getfixturevalue(name)
    pairs = list(zip(images336, PROMPTS))
    results = run_node(transformers_js, export, pairs, pixels=tmp_path)
    assert len(results) == len(pairs)
    with Pipeline(export) as pipe:
        image_token = pipe.manifest.image.image_token_id
        kept_tokens = pipe.manifest.image.kept_image_tokens
        for i, ((image, prompt), js) in enumerate(zip(pairs, results)):
            request_ = pipe.prepare([image], [prompt])
            ours = request_.vision.pixel_values
            theirs = np.fromfile(tmp_path / f"pixels_{i}.f32", dtype=np.float32).reshape(ours.shape)
            assert np.abs(theirs - ours).max() < 1e-5, "the processors' pixels differ on a 336x336 image"
            assert js["prompt_ids"].count(image_token) == kept_tokens
            assert _collapse(js["prompt_ids"], image_token) == request_.rows[0]
            [result] = pipe.generate([image], [prompt], max_new_tokens=MAX_NEW)
            assert js["token_ids"] == result.token_ids, f"{name}, image {i}"
            assert js["kept_indices"] == (None if result.kept_indices is None else [result.kept_indices])
            assert js["vision_inputs"] == ["pixel_values"]


def test_external_data_follows_the_graph_under_transformers_js_name(tmp_path):
    """A graph over 2 GB (here: a small one saved the same way) keeps its weights beside it as
    ``<file>_data``, the name Transformers.js loads when ``use_external_data_format`` says so."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fsr.export.transformers_js import convert_graph

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"])], "decoder",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    source = tmp_path / "decoder.onnx"
    onnx.save_model(model, source, save_as_external_data=True, location="decoder.onnx.data", size_threshold=0)
    target = tmp_path / "onnx" / "decoder_model_merged.onnx"
    assert convert_graph(source, target, "decoder", fp16=False) == 1
    assert not source.exists() and not (tmp_path / "decoder.onnx.data").exists()
    assert (tmp_path / "onnx" / "decoder_model_merged.onnx_data").is_file()
    session = ort.InferenceSession(str(target))
    assert session.get_inputs()[0].shape[0] == "batch_size"
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(session.run(None, {"inputs_embeds": x})[0], x @ weight)


OTHER_METHODS = [m for m in method_names(exportable=True)
                 if m not in ("none", "fsr") and get_method(m).prunes_in != "llm"]


def test_a_method_that_prunes_inside_the_llm_is_refused(tmp_path):
    """Transformers.js runs one decoder graph: PIO-FVLM (decoder segments + pruning graphs) is refused
    before anything is written, with the fix."""
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    loaded = load_model("tiny-deep", family="llava")
    with pytest.raises(LayoutError, match="use --format native"):
        export_model(loaded, tmp_path / "x", ExportSettings("pio-fvlm", format="transformers.js"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_in_graph_methods_run_in_transformers_js(method, transformers_js, images336, tmp_path_factory):
    """Every other exportable method, default settings, fp32: Transformers.js = our pipeline."""
    try:
        export = _export(tmp_path_factory, method, method)
    except LayoutError as exc:
        pytest.skip(f"{method} cannot run in Transformers.js as it is: {exc}")
    pairs = [(images336[1], PROMPTS[0])]
    [js] = run_node(transformers_js, export, pairs)
    with Pipeline(export) as pipe:
        [result] = pipe.generate([pairs[0][0]], [pairs[0][1]], max_new_tokens=MAX_NEW)
    assert js["token_ids"] == result.token_ids
    assert js["kept_indices"] == (None if result.kept_indices is None else [result.kept_indices])


# ----------------------------------------------------------------------------- our other commands on it


def test_fsr_compare_reads_it(tjs_fsr16, tmp_path):
    """fsr-compare: every graph of the fp16 FSR export (renamed output, float32 pixels) vs PyTorch, end to end."""
    from fsr.compare import CompareOptions, compare_export

    report = compare_export(tjs_fsr16, CompareOptions(backends=("torch", "ort"), out_dir=tmp_path, fidelity=False,
                                                      max_new_tokens=4))
    assert report["passed"], report["failures"]
    vision = [g for g in report["graphs"] if g["graph"] == "vision" and g["backend"] == "ort"]
    assert vision and {o["output"] for o in vision[0]["outputs"]} == {"image_features", "kept_indices"}


def test_fsr_build_reads_it(tjs_fsr16, tmp_path):
    """fsr-build: profiles from the batch_size dims, the fp16 vision encoder (float32 pixels) seen as fp16,
    and a TensorRT engine built ahead of time (where tensorrt or tensorrt_rtx is installed)."""
    from fsr.engines.loader import graph_float_type
    from fsr.engines.profiles import graph_profiles

    manifest = read_manifest(tjs_fsr16)
    prefill, decode = graph_profiles(manifest, "decoder", 2, 256)
    assert prefill.dims["batch"] == [1, 1, 2] and decode.dims["past_sequence"][2] == 255
    assert graph_float_type(tjs_fsr16 / manifest.graphs["vision"].file) == "fp16"
    try:
        from fsr.engines.trt_import import TensorRTMissing, import_tensorrt

        import_tensorrt()
    except (ImportError, TensorRTMissing) as exc:
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc}")
    from fsr.engines.builder import BuildSettings, build_engines

    export = tmp_path / "export"
    shutil.copytree(tjs_fsr16, export)
    build_engines(export, BuildSettings(precision="fp16", max_batch=1, max_seq=256, graphs=("embed",)))
    engines = read_manifest(export).engines
    assert [e.graph for e in engines.values()] == ["embed"]
    assert next(iter(engines.values())).source.file == "onnx/embed_tokens_fp16.onnx"
