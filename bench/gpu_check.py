"""The GPU check: one prepared script for a lent NVIDIA GPU (H100 / H200), about 8 minutes, one JSON.

    python -m fsr.bench.gpu_check --out gpu-check.json            # on the GPU machine
    python -m fsr.bench.gpu_check --out dry.json --dry-run        # here: the same steps, small, on the CPU

Steps, each timed and recorded (a step that cannot run says why; the others still run):

1. ``environment``: GPU name and memory (``torch.cuda``), compute capability, CUDA and driver
   versions (``nvidia-smi``), nvcc, package versions, the load average.
2. ``build``: the plugin's kernels and their C ABI (``libfsr_kernels_test.so``) with CMake and nvcc
   for this GPU's architecture (``plugin/kernel_library.py``, the plugin's own build entry point).
3. ``kernel_test``: the plugin's kernel tests (``tests/test_plugin_kernels.py``: kernels against
   the PyTorch reference, ties, identity), then ``plugin/bench_kernel.py`` at N = 576 and N = 2,880
   (LLaVA-1.5 and LLaVA-NeXT token counts; D = 4,096, F = 1,024, fp16 tokens, budgets 64 / 192 /
   320): kept indices of the kernels against the fixed-shape PyTorch op, and both timed on CUDA
   (``kernel_timing``). Both are the plugin's entry points, run as subprocesses, their output kept.
4. ``bench``: ``fsr-bench --preset llava-1.5-7b --backend torch --budgets 576,192,64 --batch 1,4``
   (the 7B preset built on the GPU in fp16, transformers ``generate`` on the same weights beside
   it); its whole JSON document is embedded.

``--dry-run`` runs the same steps where no GPU is: the kernel build (nvcc compiles without a GPU;
``--skip-build`` skips it), the kernel tests (they skip themselves without a GPU), the kernel timing
(reported as not run), and ``fsr-bench`` on the ``tiny`` preset on the CPU with one measured run.
Needs this package installed with its dependencies (``pip install -e .``; no network is used).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugin"
KERNEL_TESTS = ROOT / "tests" / "test_plugin_kernels.py"
SCHEMA = "fsr-gpu-check/1"
#: token counts of the kernel timing: LLaVA-1.5 (one 336 px image) and LLaVA-NeXT (anyres, 5 crops)
KERNEL_TOKENS = (576, 2880)
KERNEL_SIZES = {"dim": 4096, "features": 1024, "budgets": (64, 192, 320), "dtype": "fp16"}
BENCH_ARGS = ["--preset", "llava-1.5-7b", "--backend", "torch", "--budgets", "576,192,64", "--batch", "1,4",
              "--warmup", "1", "--repeat", "5", "--new-tokens", "16"]
DRY_BENCH_ARGS = ["--preset", "tiny", "--backend", "torch", "--device", "cpu", "--budgets", "576,192,64",
                  "--batch", "1,2", "--warmup", "0", "--repeat", "1", "--new-tokens", "3", "--peak-matmul", "256",
                  "--peak-copy-mib", "8"]


def _run(command: list[str], timeout: float, cwd: Path = ROOT) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        code, out, errors = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, errors = None, exc.stdout or "", f"timed out after {timeout:.0f} s"
    except OSError as exc:
        code, out, errors = None, "", str(exc)
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return {"command": command, "returncode": code, "seconds": time.perf_counter() - start,
            "stdout_tail": (out or "")[-6000:], "stderr_tail": (errors or "")[-3000:]}


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{major}.{minor}",
            "arch": f"{major}{minor}", "torch_cuda": torch.version.cuda}


def environment() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "gpu": _gpu(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "packages": {}}
    for pkg in ("fsr-export", "torch", "triton", "cupy-cuda12x", "cupy-cuda13x", "onnxruntime", "transformers"):
        try:
            info["packages"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        query = _run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 30)
        info["nvidia_smi"] = query["stdout_tail"].strip() or query["stderr_tail"].strip()
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK)
                                     else None)
    info["nvcc"] = _run([nvcc, "--version"], 30)["stdout_tail"].strip().splitlines()[-1] if nvcc else None
    return info


def build(build_dir: Path, arch: str) -> dict:
    """The plugin's kernel library, with the plugin's own build helper (CMake + nvcc)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        import kernel_library  # noqa: PLC0415 (plugin/ is not a package)
    finally:
        sys.path.remove(str(PLUGIN))
    start = time.perf_counter()
    try:
        library = kernel_library.build_kernel_library(build_dir, arch)
    except (FileNotFoundError, RuntimeError) as exc:
        return {"status": "failed", "arch": arch, "error": str(exc)[-4000:], "seconds": time.perf_counter() - start}
    return {"status": "built", "arch": arch, "library": str(library), "seconds": time.perf_counter() - start}


def kernel_tests(workdir: Path, timeout: float, tests: Path = KERNEL_TESTS) -> dict:
    report = workdir / "kernel-tests.xml"
    run = _run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tests),
                f"--junitxml={report}"], timeout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cases = []
    if report.is_file():
        root = ElementTree.parse(report).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    message = (child.get("message") or "")[:300]
                    break
            else:
                message = ""
            cases.append({"name": case.get("name"), "outcome": outcome, "message": message,
                          "seconds": float(case.get("time", 0))})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "failed" if counts["failures"] or counts["errors"] or run["returncode"] not in (0, 5) else \
        ("passed" if passed else "skipped")
    return {"status": status, "counts": {**counts, "passed": passed}, "cases": cases, "run": run}


_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+|-)\s+([\d.]+x|-)\s+(.*)$")


def kernel_timing(library: str | None, gpu: dict | None, timeout: float) -> list[dict]:
    """``plugin/bench_kernel.py`` per token count: kernel vs fixed-shape PyTorch op on CUDA, same inputs."""
    out = []
    for tokens in KERNEL_TOKENS:
        entry = {"tokens": tokens, "dim": KERNEL_SIZES["dim"], "features": KERNEL_SIZES["features"],
                 "dtype": KERNEL_SIZES["dtype"], "rows": []}
        if gpu is None:
            out.append({**entry, "status": "not run: no GPU"})
            continue
        command = [sys.executable, str(PLUGIN / "bench_kernel.py"), "--tokens", str(tokens), "--dim",
                   str(KERNEL_SIZES["dim"]), "--features", str(KERNEL_SIZES["features"]), "--dtype",
                   KERNEL_SIZES["dtype"], "--budget", *map(str, KERNEL_SIZES["budgets"])]
        if library:
            command += ["--lib", library]
        run = _run(command, timeout)
        for line in run["stdout_tail"].splitlines():
            match = _ROW.match(line)
            if match:
                budget, kernel_ms, torch_ms, _, note = match.groups()
                entry["rows"].append({"budget": int(budget), "kernel_ms": float(kernel_ms),
                                      "torch_fixed_ms": None if torch_ms == "-" else float(torch_ms),
                                      "indices": note.strip()})
        ok = run["returncode"] == 0 and entry["rows"] and all(r["indices"] == "identical" for r in entry["rows"])
        out.append({**entry, "status": "identical indices" if ok else "check the output", "run": run})
    return out


def bench(args: list[str], workdir: Path) -> dict:
    """``fsr-bench`` in this process; its JSON document."""
    from fsr.bench.cli import main  # noqa: PLC0415

    path = workdir / "bench.json"
    start = time.perf_counter()
    code = main([*args, "--json", str(path), "--plot", str(workdir / "bench.png"), "--cache-dir",
                 str(workdir / "cache")])
    result = {"args": args, "returncode": code, "seconds": time.perf_counter() - start}
    if path.is_file():
        result["document"] = json.loads(path.read_text())
    return result


def check(out: Path, *, dry_run: bool = False, skip_build: bool = False, workdir: Path | None = None) -> dict:
    started = time.perf_counter()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fsr-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict = {"schema": SCHEMA, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "dry_run": dry_run, "steps": {}}
    env = doc["environment"] = environment()
    gpu = env["gpu"]
    if gpu is None and not dry_run:
        doc["error"] = "no CUDA GPU visible to PyTorch: run on a GPU machine, or pass --dry-run"
        _write(out, doc, started)
        return doc
    arch = gpu["arch"] if gpu else "90"
    library = None
    if skip_build:
        doc["build"] = {"status": "skipped (--skip-build)"}
    else:
        doc["build"] = build(workdir / "plugin-build", arch)
        library = doc["build"].get("library")
    doc["kernel_test"] = kernel_tests(workdir, timeout=300)
    doc["kernel_timing"] = kernel_timing(library, gpu, timeout=180)
    doc["bench"] = bench(DRY_BENCH_ARGS if dry_run else BENCH_ARGS, workdir)
    _write(out, doc, started)
    return doc


def _write(out: Path, doc: dict, started: float) -> None:
    doc["wall_s"] = time.perf_counter() - started
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def summary(doc: dict) -> str:
    lines = [f"GPU: {(doc['environment'].get('gpu') or {}).get('name', 'none')}  (dry run: {doc['dry_run']})"]
    if "error" in doc:
        return "\n".join(lines + [f"error: {doc['error']}"])
    lines.append(f"build: {doc['build']['status']}")
    kt = doc["kernel_test"]
    lines.append(f"kernel tests: {kt['status']} {kt['counts']}")
    for t in doc["kernel_timing"]:
        rows = ", ".join(f"K={r['budget']}: kernel {r['kernel_ms']:.3f} ms vs torch {r['torch_fixed_ms']} ms "
                         f"({r['indices']})" for r in t["rows"])
        lines.append(f"kernel timing N={t['tokens']}: {t['status']}{': ' + rows if rows else ''}")
    b = doc["bench"]
    lines.append(f"fsr-bench: exit {b['returncode']} in {b['seconds']:.0f} s, "
                 f"{len((b.get('document') or {}).get('results', []))} rows")
    lines.append(f"total {doc['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsr.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON written")
    parser.add_argument("--dry-run", action="store_true", help="the same steps, small, without a GPU")
    parser.add_argument("--skip-build", action="store_true", help="do not build the plugin kernels")
    parser.add_argument("--workdir", type=Path, help="where builds and intermediate files go (default: a temp dir)")
    args = parser.parse_args(argv)
    doc = check(args.out, dry_run=args.dry_run, skip_build=args.skip_build, workdir=args.workdir)
    print(summary(doc))
    print(f"wrote {args.out}")
    return 2 if "error" in doc else 0


if __name__ == "__main__":
    sys.exit(main())
