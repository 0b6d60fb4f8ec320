"""Issue 9, second part: every bad input named, no silent wrong result, and the first five
minutes. Each test triggers what went wrong before (an incomplete checkpoint, a 100 KB
prompt, ``--json`` into /proc, ``--backends trt`` without TensorRT, ...) and asserts what
happens now. The kill case runs a real ``fsr-run`` process; the rest run the commands in
process (typer's runner) with the heavy steps replaced where only the order matters."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fsr.cli import printable, run_app
from fsr.errors import InputError, Note

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def text(result) -> str:
    return re.sub(r"\s+", " ", result.output)


def never(*args, **kwargs):
    raise AssertionError("this must not run: the arguments should have been refused first")


def apps():
    from fsr.bench.cli import app as bench, op_app
    from fsr.compare.cli import app as compare
    from fsr.engines.cli import app as build
    from fsr.export.cli import app as export
    from fsr.runtime.cli import app as run

    return {"fsr-export": export, "fsr-run": run, "fsr-build": build, "fsr-compare": compare, "fsr-bench": bench,
            "fsr-bench op": op_app}


# ----------------------------------------------------------------------------- errors instead of tracebacks


@pytest.mark.parametrize("keep, message", [
    (("config.json", "model.safetensors"), "has no tokenizer files"),
    (("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
     "has no image-processor configuration"),
])
def test_checkpoint_without_processor_files_is_refused_before_loading(export_none, tmp_path, monkeypatch, keep,
                                                                      message):
    """Was: an internal error (OSError from AutoProcessor) after the weights were loaded."""
    import fsr.export.cli as cli

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in keep:
        shutil.copy(export_none / "source" / name, ckpt / name)
    monkeypatch.setattr(cli, "load_model", never)
    result = runner.invoke(cli.app, ["llava", "--method", "none", "--model", str(ckpt), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert message in text(result) and "incomplete" in text(result) and "save_pretrained" in text(result)
    assert not (tmp_path / "x").exists()


def test_complete_checkpoint_passes_the_processor_check(export_none):
    from fsr.models import check_checkpoint

    assert check_checkpoint(export_none / "source", "llava")["model_type"] == "llava"


@pytest.mark.parametrize("app, args", [
    ("fsr-compare", ["--json", "/proc/fsr-report.json"]),
    ("fsr-compare", ["--json", "{tmp}"]),
    ("fsr-compare", ["--json", "{file}/report.json"]),
    ("fsr-compare", ["--out", "/proc/fsr-compare"]),
    ("fsr-bench", ["--json", "/proc/fsr-bench.json"]),
    ("fsr-bench", ["--plot", "{file}/plot.png"]),
    ("fsr-bench", ["--markdown", "/sys/fsr-bench.md"]),
])
def test_unwritable_outputs_are_refused_before_the_run(export_none, tmp_path, monkeypatch, app, args):
    """Was: the results of a run of minutes lost to a traceback at the end."""
    import fsr.bench.targets as targets
    import fsr.compare.run as compare_run

    monkeypatch.setattr(compare_run, "compare_export", never)
    monkeypatch.setattr(targets, "targets_from_exports", never)
    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in args]
    result = runner.invoke(apps()[app], [str(export_none), *args])
    assert result.exit_code == 2, result.output
    assert re.search(r"virtual '(proc|sysfs)' file system|is a folder|is a file, not a folder", text(result))
    assert (tmp_path / "file").read_text() == "a file, not a folder"


def test_bench_op_json_is_checked_first(monkeypatch):
    import fsr.bench.op as op

    monkeypatch.setattr(op, "bench_op", never)
    assert run_app(apps()["fsr-bench op"], ["--json", "/proc/op.json"]) == 2


def test_check_output_file_accepts_a_new_file_in_a_new_folder(tmp_path):
    from fsr.files import OutputError, check_output_file

    check_output_file(tmp_path / "new" / "deeper" / "out.json", option="--json")
    assert not (tmp_path / "new").exists()  # no side effects
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(OutputError, match="dangling"):
        check_output_file(tmp_path / "dangling", option="--json")


# ----------------------------------------------------------------------------- the model's context


@pytest.fixture(scope="module")
def pipe(export_none):
    from fsr.runtime.pipeline import Pipeline

    with Pipeline(export_none) as p:
        yield p


def test_prompt_longer_than_the_context_is_refused_before_anything_runs(pipe, images, monkeypatch):
    """Was: a 100 KB prompt ran the CLIP chunks, then ONNX Runtime tried to allocate 149 GiB."""
    monkeypatch.setattr(pipe, "instruction_embeds", never)
    monkeypatch.setattr(pipe, "vision", never)
    prompt = "word " * 20000
    with pytest.raises(InputError, match=r"more than the model's context of 4096: shorten the prompt") as err:
        pipe.generate([images[0], images[1]], ["Hi", prompt], max_new_tokens=2)
    # the message counts the longest row (the second), one image's tokens, and the room left for text
    image = pipe.manifest.image.kept_image_tokens
    text = int(re.search(r"\((\d+) text tokens \+ (\d+) image tokens\)", str(err.value)).group(1))
    assert f"({text} text tokens + {image} image tokens)" in str(err.value) and text > 20000
    assert f"shorten the prompt to at most {4096 - image} text tokens" in str(err.value)


def test_max_new_tokens_beyond_the_context_is_shortened_with_a_note(pipe, images, monkeypatch):
    """Was: generation went on past the model's positions (a silently wrong result)."""
    request = pipe.prepare([images[0]], ["Hi"])
    longest = pipe.prompt_positions(request.rows[0])
    monkeypatch.setattr(pipe.manifest.llm, "max_positions", longest + 2)  # room for 3 new tokens
    monkeypatch.setattr(pipe, "eos", set())  # never stop early: the context is what stops it
    with pytest.warns(Note, match=r"max_new_tokens 50 does not fit .* generating at most 3 tokens"):
        [result] = pipe.generate([images[0]], ["Hi"], max_new_tokens=50)
    assert len(result.token_ids) == 3 and result.stop == "length"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Note)  # within the context: no note
        assert len(pipe.generate([images[0]], ["Hi"], max_new_tokens=3)[0].token_ids) == 3


def test_generate_hands_out_tokens_as_they_come(pipe, images):
    seen = []
    [a, b] = pipe.generate([images[0], images[1]], ["Hi", "What is this?"], max_new_tokens=4,
                           on_tokens=lambda new: seen.append(list(new)))
    assert [s[0] for s in seen if s[0] is not None] == a.token_ids
    assert [s[1] for s in seen if s[1] is not None] == b.token_ids
    assert 1 <= len(seen) <= 4


# ----------------------------------------------------------------------------- fsr-run output


def test_run_json_has_one_shape_for_one_image_and_a_batch(export_fsr64, images):
    """Was: an object for one image, a list for a batch, without kept_indices."""
    shapes = []
    for n in (1, 2):
        args = [str(export_fsr64)]
        for i in range(n):
            args += ["--image", str(images[i]), "--prompt", "Hi"]
        result = runner.invoke(apps()["fsr-run"], [*args, "--max-new-tokens", "2", "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout.strip().splitlines()[-1])
        assert set(doc) == {"export", "backend", "random_weights", "results"} and doc["random_weights"] is True
        assert len(doc["results"]) == n
        for r in doc["results"]:
            assert set(r) == {"token_ids", "text", "kept_indices", "stop"} and r["stop"] in ("eos", "length")
            assert len(r["kept_indices"]) == 64 and r["kept_indices"] == sorted(r["kept_indices"])
        shapes.append(set(doc))
    assert shapes[0] == shapes[1]


def _fake_generate(texts, interrupt=False):
    """A Pipeline.generate stand-in: the tokens of the given texts (one row), then maybe Ctrl-C."""
    def generate(self, images, prompts, *, raw=False, max_new_tokens=32, on_tokens=None):
        from fsr.runtime.pipeline import GenerationResult

        ids = []
        for piece in texts:
            for token in self.tokenizer(piece, add_special_tokens=False)["input_ids"]:
                ids.append(token)
                on_tokens([token])
        if interrupt:
            raise KeyboardInterrupt
        return [GenerationResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), None, {}, "length")]
    return generate


def test_generated_text_is_printed_safely(export_none, images, monkeypatch):
    """Was: terminal escapes and control characters from the random model reached the terminal."""
    from fsr.runtime.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "generate", _fake_generate(["ok \x1b[2J\x1b]0;title\x07", " end\r!"]))
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(images[0]), "--prompt", "Hi"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\x07" not in result.stdout
    assert "ok \\x1b[2J\\x1b]0;title\\x07 end\\r!" in result.stdout


def test_printable_keeps_text_and_escapes_controls():
    assert printable("Hello, wörld 你好 \ufffd\n\tx") == "Hello, wörld 你好 \ufffd\n\tx"
    assert printable("a\x1b[31mb\x9bc\u202ed\u2028e\x00") == "a\\x1b[31mb\\x9bc\\u202ed\\u2028e\\x00"


def test_interrupted_json_run_prints_what_was_generated(export_none, images, monkeypatch):
    from fsr.runtime.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "generate", _fake_generate(["abc"], interrupt=True))
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(images[0]), "--prompt", "Hi",
                                               "--json"])
    assert result.exit_code == 130, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["results"][0]["text"] == "abc" and doc["results"][0]["stop"] == "interrupted"


def test_random_weights_are_named_on_every_run(export_none, images):
    """Was: byte garbage with no word about the random weights."""
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(images[0]), "--prompt", "Hi",
                                               "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    assert "note: this export has random weights (the built-in 'tiny' preset): the generated text is meaningless" \
        in text(result)


def test_animated_gif_note_is_a_note_line(export_none, tmp_path):
    """Was: a raw Python warning line (file:line: InputNote: ...)."""
    from PIL import Image

    frames = [Image.new("RGB", (48, 48), c) for c in ("red", "lime", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(tmp_path / "anim.gif"),
                                               "--prompt", "Hi", "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    assert "note: image" in text(result) and "only the first frame is used" in text(result)
    assert "InputNote" not in result.output and "warnings.warn" not in result.output


def test_trt_only_options_with_another_backend_are_refused(export_none, images, monkeypatch):
    import fsr.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "Pipeline", never)
    result = runner.invoke(apps()["fsr-run"], [str(export_none), "--image", str(images[0]), "--prompt", "Hi",
                                               "--precision", "fp16"])
    assert result.exit_code == 2 and "--precision applies to --backend trt only" in text(result)


def test_streamed_text_survives_an_interrupt(export_none, images, tmp_path):
    """A real fsr-run, stopped by SIGINT while it generates: what it printed stays, exit 130."""
    command = [sys.executable, "-c", "import sys; from fsr.runtime.cli import main; main()", str(export_none),
               "--image", str(images[0]), "--prompt", "Describe the picture.", "--max-new-tokens", "100000"]
    out, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as o, open(err_file, "wb") as e:
        proc = subprocess.Popen(command, stdout=o, stderr=e, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and out.stat().st_size < 4:
            time.sleep(0.1)
        assert proc.poll() is None, err_file.read_text()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        proc.kill()
    printed = out.read_bytes()
    assert rc == 130, err_file.read_text()
    assert len(printed) >= 4 and printed.endswith(b"\n")
    assert not any(b < 32 and b not in (9, 10) for b in printed)  # control characters were escaped
    assert "interrupted" in err_file.read_text()
    assert "generating at most" in err_file.read_text()  # --max-new-tokens 100000 was shortened, with a note


# ----------------------------------------------------------------------------- fsr-export


def test_missing_clip_is_refused_before_loading(export_none, tmp_path, monkeypatch):
    """Was: --clip PATH that does not exist silently ignored (preset) or an unclear 'unknown model'."""
    import fsr.export.cli as cli

    monkeypatch.setattr(cli, "load_model", never)
    out = str(tmp_path / "x")
    result = runner.invoke(cli.app, ["llava", "--method", "none", "--clip", str(tmp_path / "nope"), "-o", out])
    assert result.exit_code == 2 and "--clip applies to a checkpoint given with --model" in text(result)
    ckpt = str(export_none / "source")
    result = runner.invoke(cli.app, ["llava", "--method", "none", "--model", ckpt, "--clip", str(tmp_path / "nope"),
                                     "-o", out])
    assert result.exit_code == 2 and f"--clip {tmp_path / 'nope'}: no such folder" in text(result)
    result = runner.invoke(cli.app, ["llava", "--method", "none", "--model", ckpt, "--clip", ckpt, "-o", out])
    assert result.exit_code == 2 and "holds a 'llava' checkpoint, not a CLIP model" in text(result)
    assert not (tmp_path / "x").exists()


def test_budget_at_least_the_token_count_is_named_the_identity(tmp_path, monkeypatch):
    """Was: only the last line said so, after the whole export."""
    import fsr.export

    seen = []
    monkeypatch.setattr(fsr.export, "export_model", lambda *a, **k: seen.append(a[2]))
    result = runner.invoke(apps()["fsr-export"], ["llava", "--budget", "1000", "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "note: --budget 1000 >= the 576 image tokens of this model: fsr keeps every token (the identity)" \
        in text(result)
    assert seen and text(result).index("note: --budget") < text(result).index("exported")
    result = runner.invoke(apps()["fsr-export"], ["llava", "--budget", "64", "-o", str(tmp_path / "y")])
    assert result.exit_code == 0 and "identity" not in text(result)


def test_identity_is_the_methods_answer():
    from fsr.pruning.methods import get_method

    fsr, none = get_method("fsr"), get_method("none")
    assert fsr.is_identity(fsr.settings(budget=576), 576) and not fsr.is_identity(fsr.settings(budget=575), 576)
    assert fsr.identity_note(fsr.settings(budget=64), 576) is None
    assert not none.is_identity(none.settings(), 576)


# ----------------------------------------------------------------------------- fsr-compare


def test_compare_with_only_trt_where_it_cannot_run_fails_before_running(export_none, monkeypatch):
    """Was: 'PASSED' with nothing compared."""
    import fsr.compare.run as compare_run
    from fsr.compare.trt import unavailable_reason
    from fsr.manifest import read_manifest

    if unavailable_reason(read_manifest(export_none)) is None:
        pytest.skip("TensorRT runs here")
    monkeypatch.setattr(compare_run, "ReferenceFromExport", never)
    result = runner.invoke(apps()["fsr-compare"], [str(export_none), "--backends", "trt"])
    assert result.exit_code == 2, result.output
    assert "nothing to compare: TensorRT cannot run here" in text(result) and "--backends ort" in text(result)
    result = runner.invoke(apps()["fsr-compare"], [str(export_none), "--no-graph-checks", "--no-end-to-end",
                                                   "--no-fidelity"])
    assert result.exit_code == 2 and "nothing to compare" in text(result)


def test_compare_writes_under_the_export_not_the_working_folder(export_none, tmp_path, monkeypatch):
    """Was: ./fsr-compare/<export name>/ in whatever folder the command ran from."""
    from fsr.compare.run import CompareOptions, compare_export

    export = tmp_path / "export"
    shutil.copytree(export_none, export)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    report = compare_export(export, CompareOptions(backends=("torch", "ort"), graphs=("embed",), end_to_end=False,
                                                   fidelity=False, builtin_samples=1))
    assert report["passed"] and report["output_dir"] == str((export / "compare").resolve())
    assert list(work.iterdir()) == [] and (export / "compare" / "embed" / "inputs.json").is_file()


# ----------------------------------------------------------------------------- fsr-bench cache


def test_bench_cache_is_keyed_by_the_tools_version(tmp_path, monkeypatch):
    """Was: ~/.cache/fsr-bench reused exports without checking which version made them."""
    import fsr.bench.targets as targets
    from fsr.export import describe
    from fsr.manifest import FileRecord, sha256, write_manifest
    from fsr.models import load_model

    tiny = load_model("tiny", device="meta")
    calls = []

    def exporter(loaded, output, settings, force=False):
        calls.append(output)
        output.mkdir(parents=True, exist_ok=True)
        manifest = describe(tiny, settings)
        for name, graph in manifest.graphs.items():
            (output / f"{name}.onnx").write_bytes(name.encode())
            graph.files = [FileRecord(f"{name}.onnx", sha256(output / f"{name}.onnx"))]
        write_manifest(output, manifest)

    key = targets.export_cache_key()
    assert re.fullmatch(r"v[^-]+-[0-9a-f]{12}", key) and targets.export_cache_key() == key
    targets.ensure_preset_exports("tiny", [64], tmp_path, exporter=exporter, loader=lambda *a: object())
    assert len(calls) == 2 and all(key in str(c) for c in calls)
    real = targets.package_versions
    monkeypatch.setattr(targets, "package_versions", lambda: {**real(), "torch": "0.0.1"})  # another environment
    other = targets.export_cache_key()
    assert other != key
    records = targets.ensure_preset_exports("tiny", [64], tmp_path, exporter=exporter, loader=lambda *a: object())
    assert len(calls) == 4 and not any(r["reused"] for r in records)  # nothing of the other version reused
    assert targets.other_cache_keys(tmp_path, other) == [tmp_path / key]


# ----------------------------------------------------------------------------- the command line itself


@pytest.mark.parametrize("name, args", [("fsr-export", ["--help"]), ("fsr-export", ["llava", "--help"]),
                                        ("fsr-run", ["--help"]), ("fsr-build", ["--help"]),
                                        ("fsr-compare", ["--help"]), ("fsr-bench", ["--help"]),
                                        ("fsr-bench op", ["--help"])])
def test_boolean_flags_read_as_flags_in_the_help(name, args, capsys):
    """Was: '--json <bool>' (and '--json true' rejected)."""
    assert run_app(apps()[name], args, prog_name=name) == 0
    help_text = capsys.readouterr().out
    assert "--help" in help_text and ("--debug" in help_text or args == ["--help"] and name == "fsr-export")
    assert "<bool>" not in help_text


def test_flag_given_a_value_says_how_to_write_it(export_none, capsys):
    assert run_app(apps()["fsr-run"], [str(export_none), "--image", "x.png", "--prompt", "hi", "--json", "true"]) == 2
    assert "--json is a flag and takes no value: write --json alone to turn it on" in \
        capsys.readouterr().err.replace("\n", " ")


def test_build_summary_fits_80_columns():
    """Was: a rich table cut to 'engines…' in logs."""
    from fsr.engines.builder import BuildReport, EngineReport
    from fsr.engines.cli import profile_lines, report_lines
    from fsr.engines.profiles import Profile

    prefill = Profile("prefill", {}, {"batch": [1, 1, 4], "sequence": [1, 128, 2048], "past_sequence": [0, 0, 0],
                                      "total_sequence": [1, 128, 2048]})
    engines = [EngineReport(f"{g}.fp16", g, "fp16", g == "vision", f"engines/{g}.fp16.engine", 5 << 20, 4.0,
                            [prefill.to_json()], "tensorrt_rtx", "1.7.1.116", 120)
               for g in ("vision", "embed", "text_encoder", "decoder")]
    report = BuildReport(Path("exports/llava-tiny-fsr-b64"), "tensorrt_rtx", "1.7.1.116", None, engines, "", None,
                         [], 20.0)
    lines = report_lines(report) + profile_lines(report)
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "…" not in "".join(lines)
    assert any(line.startswith("text_encoder.fp16.engine") and "fp16" in line and "120" in line for line in lines)
    assert "past_sequence 0" in " ".join(lines)


# ----------------------------------------------------------------------------- the README's first use


def test_quickstart_commands_fit_the_tool():
    """The README's two commands: the export folder the second names is the one the first makes,
    and the picture exists."""
    from fsr.export.cli import default_output
    from fsr.models import FAMILIES

    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    export_line, run_line = [line for line in block.splitlines() if line.strip()][:2]
    assert "fsr-export llava --budget 64" in export_line
    folder = default_output(FAMILIES["llava"], None, "fsr", 64)
    assert f"fsr-run {folder.as_posix()} --image examples/photo.png" in run_line
    assert (ROOT / "examples" / "photo.png").is_file()
    assert "random weights" in readme and "meaningless" in readme  # says what output to expect


def test_gitignore_covers_what_the_readme_commands_write():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["exports/llava-tiny-fsr-b64/manifest.json", "exports/llava-tiny-fsr-b64/compare/embed/inputs.json",
               "exports/llava-tiny-fsr-b64/engines/vision.fp32.engine", "out/bench-small.json",
               "bench-small.json", "bench-small.png", "bench.json", "fsr-compare/x/inputs.json",
               "fsr_export.egg-info/PKG-INFO", ".venv/bin/python"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(written), result.stdout


def test_manifest_context_is_known(export_none):
    from fsr.manifest import read_manifest

    assert read_manifest(export_none).llm.max_positions == 4096


def test_input_notes_are_notes():
    from fsr.runtime.inputs import InputNote

    assert issubclass(InputNote, Note) and issubclass(Note, UserWarning)
