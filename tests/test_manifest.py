"""The typed manifest: read, verify, write; malformed, older and escaping manifests are refused
with a message naming the problem (never a traceback)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from fsr.manifest import (
    FORMAT_VERSION, MANIFEST, GraphEntry, Manifest, ManifestError, read_manifest, sha256, write_manifest,
)


@pytest.fixture
def copy(export_none, tmp_path):
    """A copy of the unpruned tiny export (tests change it)."""
    out = tmp_path / "export"
    shutil.copytree(export_none, out)
    return out


def edit(folder, change):
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_round_trip_and_types(export_fsr64):
    m = read_manifest(export_fsr64, verify=True)
    assert isinstance(m, Manifest) and m.format_version == FORMAT_VERSION and m.family == "llava"
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    vision = m.graphs["vision"]
    assert isinstance(vision, GraphEntry) and vision.file == vision.files[0].path == "vision.onnx"
    assert m.method.name == "fsr" and m.method.settings["budget"] == 64
    assert m.model.random_weights and m.model.preset == "tiny"
    sources = {f.path for f in m.source.files}
    assert {"source/config.json", "source/tokenizer.json", "source/clip/config.json"} <= sources
    assert any(p.endswith(".safetensors") for p in sources)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.clear() or d.update(format_version=1, graphs={}), "made by an older fsr-export"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "made by a newer fsr-export"),
    (lambda d: d.pop("format_version"), "no valid format_version"),
    (lambda d: d["graphs"]["vision"].update(files=[]), "graph 'vision' lists no files"),
    (lambda d: d["graphs"]["vision"].pop("files"), "graphs.vision.files is missing"),
    (lambda d: d["graphs"]["vision"].update(files="vision.onnx"), "graphs.vision.files: expected a list"),
    (lambda d: d["llm"].update(num_layers="two"), "llm.num_layers: expected an integer"),
    (lambda d: d.update(decoder_segments=[{"graph": "nope", "layers": [0, 2]}]), "decoder segment 'nope'"),
])
def test_malformed_manifest_gives_a_message(copy, change, message):
    edit(copy, change)
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)


def test_a_json_list_is_not_a_manifest(copy):
    (copy / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="holds a JSON list, not an object"):
        read_manifest(copy)


@pytest.mark.parametrize("path", ["/etc/passwd", "../elsewhere/vision.onnx", "source/../../x.onnx", "~/x.onnx"])
def test_paths_outside_the_export_are_refused(copy, path):
    edit(copy, lambda d: d["graphs"]["vision"]["files"][0].update(path=path))
    with pytest.raises(ManifestError, match=r"absolute|leads outside the export folder"):
        read_manifest(copy)


def test_source_and_clip_paths_are_contained(copy, tmp_path):
    edit(copy, lambda d: d["source"].update(folder="/tmp"))
    with pytest.raises(ManifestError, match="absolute"):
        read_manifest(copy)
    edit(copy, lambda d: d["source"].update(folder="source"))
    edit(copy, lambda d: d["relevance"].update(clip_model="../other/clip"))
    with pytest.raises(ManifestError, match="leads outside"):
        read_manifest(copy)


def test_a_symbolic_link_out_of_the_export_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "embed.onnx", outside)
    (copy / "embed.onnx").unlink()
    os.symlink(outside, copy / "embed.onnx")
    with pytest.raises(ManifestError, match="leads outside the export folder"):
        read_manifest(copy)


def test_source_files_are_verified(copy):
    """The chat template changes what the model generates: source/ is hashed and checked."""
    template = copy / "source" / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT:", "BOT:"))
    read_manifest(copy)  # parsing alone does not hash
    with pytest.raises(ManifestError, match=r"source model: .*chat_template.jinja changed since export"):
        read_manifest(copy, verify=True)
    manifest = read_manifest(copy)
    manifest.verify(copy, source="none")  # graphs alone are intact
    with pytest.raises(ManifestError, match="chat_template.jinja"):
        manifest.verify(copy, graphs=[], source="processor")


def test_weights_are_skipped_only_for_a_runtime_that_does_not_run_them(copy):
    weights = next((copy / "source").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest = read_manifest(copy)
    manifest.verify(copy, source="processor")  # ONNX Runtime does not load the PyTorch weights
    with pytest.raises(ManifestError, match="safetensors changed since export"):
        manifest.verify(copy, source="all")


def test_fsr_run_refuses_a_changed_chat_template(copy, images):
    from fsr.runtime.cli import app

    template = copy / "source" / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT:", "BOT:"))
    result = CliRunner().invoke(app, [str(copy), "--image", str(images[0]), "--prompt", "Hi"])
    assert result.exit_code == 2 and "changed since export" in result.output


def test_writes_are_atomic(copy, monkeypatch):
    manifest = read_manifest(copy)
    before = (copy / MANIFEST).read_text()

    def fail(*args):
        raise OSError("simulated: disk full")

    monkeypatch.setattr(os, "replace", fail)
    manifest.created = "changed"
    with pytest.raises(OSError, match="disk full"):
        write_manifest(copy, manifest)
    assert (copy / MANIFEST).read_text() == before
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    monkeypatch.undo()
    write_manifest(copy, manifest)
    assert read_manifest(copy).created == "changed"


def test_the_runtime_loads_the_hashed_file(copy, images):
    """One source of truth: the graph file the runtime opens is the first hashed file."""
    from fsr.runtime.pipeline import Pipeline

    with Pipeline(copy) as pipe:
        assert pipe.runners["vision"].path == copy / pipe.manifest.graphs["vision"].files[0].path
    digest = sha256(copy / "vision.onnx")
    assert read_manifest(copy).graphs["vision"].hashes() == {"vision.onnx": digest}
