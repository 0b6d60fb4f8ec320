"""Bad input exits non-zero with a message naming the problem, and leaves nothing half-written."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fsr.export.cli import app as export_app
from fsr.runtime.cli import app as run_app

runner = CliRunner()


def _text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


def no_partial(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_budget_below_one(tmp_path, budget):
    r = runner.invoke(export_app, ["llava", "--budget", budget, "-o", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert "budget must be an integer >= 1" in _text(r)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model(tmp_path):
    r = runner.invoke(export_app, ["llava", "--model", "no-such-model", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert "unknown model 'no-such-model'" in _text(r)
    assert list(tmp_path.iterdir()) == []


def test_uncached_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(export_app, ["llava", "--model", "llava-hf/llava-1.5-7b-hf", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert "not in the Hugging Face cache" in _text(r)


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = runner.invoke(export_app, ["llava", "--model", str(tmp_path / "ckpt"), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "holds no config.json" in _text(r)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(export_app, ["llava", "--method", "none", "-o", str(out)])
    assert r.exit_code != 0
    assert "already exists; pass --force" in _text(r)
    assert (out / "keep.txt").read_text() == "mine"


def fail_at_decoder(monkeypatch):
    """Make the exporter fail when it traces the decoder (after the other graphs are written)."""
    import fsr.export.exporter as exporter

    trace = exporter.trace_graph

    def boom(graph, root):
        if graph.role == "decoder":
            raise RuntimeError("simulated failure while tracing the decoder")
        return trace(graph, root)

    monkeypatch.setattr(exporter, "trace_graph", boom)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    """A failure midway (here: tracing the decoder) removes the temporary folder."""
    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    fail_at_decoder(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(load_model("tiny"), tmp_path / "x", ExportSettings("none"))
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_success(tmp_path, monkeypatch, export_none):
    """--force with a failing export keeps the old export intact."""
    import shutil

    from fsr.export import ExportSettings, export_model
    from fsr.models import load_model

    out = tmp_path / "export"
    shutil.copytree(export_none, out)
    before = (out / "manifest.json").read_text()
    fail_at_decoder(monkeypatch)
    with pytest.raises(RuntimeError):
        export_model(load_model("tiny"), out, ExportSettings("none"), force=True)
    assert (out / "manifest.json").read_text() == before
    assert no_partial(tmp_path)


# -- fsr-run -----------------------------------------------------------------------------------


def test_run_json(export_none, images):
    r = runner.invoke(run_app, [str(export_none), "--image", str(images[0]), "--prompt", "Hi", "--max-new-tokens",
                                "3", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    [result] = payload["results"]  # one shape for one image and a batch (tests/test_first_use.py)
    assert set(result) == {"token_ids", "text", "kept_indices", "stop"} and 1 <= len(result["token_ids"]) <= 3


def test_missing_image(export_none, tmp_path):
    r = runner.invoke(run_app, [str(export_none), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi"])
    assert r.exit_code != 0 and "does not exist" in _text(r)


def test_unreadable_image(export_none, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    r = runner.invoke(run_app, [str(export_none), "--image", str(bad), "--prompt", "Hi"])
    assert r.exit_code != 0 and "cannot be read as an image" in _text(r)


def test_raw_prompt_without_image_token(export_none, images):
    r = runner.invoke(run_app, [str(export_none), "--image", str(images[0]), "--prompt", "USER: hi ASSISTANT:",
                                "--raw"])
    assert r.exit_code != 0 and "must contain the image token <image>" in _text(r)


def test_raw_prompt_with_image_token_runs(export_none, images):
    r = runner.invoke(run_app, [str(export_none), "--image", str(images[0]), "--prompt",
                                "USER: <image>\nhi ASSISTANT:", "--raw", "--max-new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output


def test_not_an_export(tmp_path, images):
    r = runner.invoke(run_app, [str(tmp_path), "--image", str(images[0]), "--prompt", "Hi"])
    assert r.exit_code != 0 and "not an fsr-export folder" in _text(r)


def test_corrupt_graph_is_refused(export_none, tmp_path, images):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(export_none, out)
    data = bytearray((out / "embed.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "embed.onnx").write_bytes(bytes(data))
    r = runner.invoke(run_app, [str(out), "--image", str(images[0]), "--prompt", "Hi"])
    assert r.exit_code != 0 and "changed since export" in _text(r)


def test_foreign_onnx_is_refused(export_none, tmp_path, images):
    """A graph file swapped for another model fails the manifest check, naming the graph."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(export_none, out)
    shutil.copy(out / "embed.onnx", out / "vision.onnx")
    r = runner.invoke(run_app, [str(out), "--image", str(images[0]), "--prompt", "Hi"])
    assert r.exit_code != 0 and "graph 'vision'" in _text(r)
