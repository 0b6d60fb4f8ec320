"""One CLI style: the five commands on typer, expected errors exit 2 with the message, anything
else says "internal error" in one line (``--debug``: the traceback), a checkpoint of another
kind is refused before any weights are built."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from fsr.cli import INTERNAL_ERROR, run_app

runner = CliRunner()


def text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


def apps():
    from fsr.bench.cli import app as bench, op_app
    from fsr.compare.cli import app as compare
    from fsr.engines.cli import app as build
    from fsr.export.cli import app as export
    from fsr.runtime.cli import app as run

    return {"fsr-export": export, "fsr-run": run, "fsr-build": build, "fsr-compare": compare, "fsr-bench": bench,
            "fsr-bench op": op_app}


@pytest.mark.parametrize("name", ["fsr-export", "fsr-run", "fsr-build", "fsr-compare", "fsr-bench", "fsr-bench op"])
def test_help_and_usage_errors(name, capsys):
    app = apps()[name]
    assert run_app(app, ["--help"], prog_name=name) == 0
    assert "--help" in capsys.readouterr().out
    assert run_app(app, ["--no-such-option"], prog_name=name) == 2


def test_export_subcommands_come_from_the_registry(capsys):
    from fsr.models import FAMILIES
    from fsr.pruning.methods import method_names

    export = apps()["fsr-export"]
    assert run_app(export, ["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in FAMILIES)
    assert run_app(export, ["llava", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--budget", "--alpha", "--rho", "--kappa", "--relevance", "--method", "--model", "--debug"):
        assert option in help_text, option
    assert all(m in help_text for m in method_names(exportable=True))


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_a_checkpoint_of_another_kind_is_refused_before_loading(tmp_path, model_type):
    ckpt = tmp_path / model_type
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 4096}))
    result = runner.invoke(apps()["fsr-export"], ["llava", "--model", str(ckpt), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert f"holds a '{model_type}' checkpoint (model_type in config.json), not a llava one" in text(result)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "none", "--budget", "64"], "--budget do(es) not apply to method 'none'"),
    (["--method", "random"], "method 'random' has no in-graph form"),
    (["--method", "fastv"], "unknown pruning method 'fastv'"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--rho", "1.5"], "--rho must be <= 1"),
    (["--relevance", "maybe"], "--relevance must be one of auto, clip, llm"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_bad_export_settings_exit_2(tmp_path, args, message):
    result = runner.invoke(apps()["fsr-export"], ["llava", *args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert message in text(result)
    assert list(tmp_path.iterdir()) == []


def test_internal_error_is_one_line_and_debug_shows_the_traceback(export_none, images, monkeypatch):
    import fsr.runtime.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(cli, "read_manifest", broken)
    args = [str(export_none), "--image", str(images[0]), "--prompt", "Hi"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == INTERNAL_ERROR
    assert "internal error: RuntimeError: simulated bug" in text(result) and "second line" not in result.output
    assert "--debug" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli.app, [*args, "--debug"])
    assert result.exit_code == INTERNAL_ERROR and "Traceback" in result.output


def test_fsr_run_checks_the_image_before_loading(export_none, tmp_path, monkeypatch):
    """A missing image is reported before the runtime (transformers, onnxruntime) is imported."""
    import fsr.runtime.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("the pipeline must not be opened")

    monkeypatch.setattr(pipeline, "Pipeline", never)
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(tmp_path / "nope.png"),
                                               "--prompt", "Hi"])
    assert result.exit_code == 2 and "does not exist" in text(result)


def test_fsr_bench_arguments(tmp_path, capsys):
    from fsr.bench.cli import main

    assert main([]) == 2
    assert "pass export folders or --preset NAME" in capsys.readouterr().err.replace("\n", " ")
    assert main(["--preset", "tiny", "--batch", "0"]) == 2
    assert "--batch takes integers >= 1" in capsys.readouterr().err.replace("\n", " ")
    assert main(["--preset", "tiny", "--budgets", "64,x"]) == 2
    assert "expected integers separated by commas" in capsys.readouterr().err.replace("\n", " ")
    assert main(["--preset", "tiny", "--family", "qwen"]) == 2
    assert "unknown model family 'qwen'" in capsys.readouterr().err.replace("\n", " ")


def test_fsr_bench_verifies_the_exports(export_none, export_fsr64, tmp_path, capsys):
    """A swapped graph stops the benchmark with the integrity message (as fsr-run does)."""
    from fsr.bench.cli import main

    swapped = tmp_path / "fsr64"
    shutil.copytree(export_fsr64, swapped)
    shutil.copy(swapped / "embed.onnx", swapped / "vision.onnx")
    args = [str(swapped), str(export_none), "--repeat", "1", "--warmup", "0", "--new-tokens", "1",
            "--peak-matmul", "64", "--peak-copy-mib", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "graph 'vision'" in err and "changed since export" in err


def test_fsr_build_refuses_an_altered_export(export_none, tmp_path):
    altered = tmp_path / "export"
    shutil.copytree(export_none, altered)
    shutil.copy(altered / "embed.onnx", altered / "vision.onnx")
    result = runner.invoke(apps()["fsr-build"], [str(altered)])
    assert result.exit_code == 2 and "graph 'vision'" in text(result) and "changed since export" in text(result)
