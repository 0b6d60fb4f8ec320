"""The prepared GPU check (``python -m fsr.bench.gpu_check``), run here as its dry run: every step
runs or says why it cannot, and one JSON holds them all."""

from __future__ import annotations

import json

import pytest


def test_dry_run_writes_one_json(tmp_path, monkeypatch):
    from fsr.bench import gpu_check

    tests = tmp_path / "test_sample.py"  # stands in for the plugin's kernel tests (they build with nvcc)
    tests.write_text("import pytest\n\ndef test_ok():\n    assert True\n\n"
                     "def test_needs_gpu():\n    pytest.skip('no CUDA GPU')\n")
    real = gpu_check.kernel_tests
    monkeypatch.setattr(gpu_check, "kernel_tests", lambda workdir, timeout: real(workdir, timeout, tests))
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--skip-build", "--workdir", str(tmp_path / "work")]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "fsr-gpu-check/1" and doc["dry_run"] is True and doc["wall_s"] > 0
    assert doc["build"]["status"].startswith("skipped")
    kt = doc["kernel_test"]
    assert kt["counts"] == {"tests": 2, "failures": 0, "errors": 0, "skipped": 1, "passed": 1}
    assert kt["status"] == "passed" and {c["outcome"] for c in kt["cases"]} == {"passed", "skipped"}
    import torch

    if not torch.cuda.is_available():
        assert [t["status"] for t in doc["kernel_timing"]] == ["not run: no GPU"] * 2
        assert doc["environment"]["gpu"] is None
    bench = doc["bench"]
    assert bench["returncode"] == 0
    rows = bench["document"]["results"]
    assert sorted({r["kept_tokens"] for r in rows}) == [64, 192, 576] and {r["batch"] for r in rows} == {1, 2}
    assert bench["document"]["backend"] == "torch" and len(bench["document"]["transformers"]) == 2


def test_without_a_gpu_the_real_check_says_so(tmp_path):
    import torch

    from fsr.bench import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "no CUDA GPU" in json.loads(out.read_text())["error"]
