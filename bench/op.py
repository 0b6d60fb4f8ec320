"""The FocusScanRefine op on its own, in every implementation the project has.

=================== ===============================================================
``torch_reference``  the readable reference (``pruning/fsr_reference.py``), per row
``torch_fixed``      the fixed-shape module (``pruning/fsr_fixed.py``), vectorised
``onnxruntime``      the op's ONNX function body in ONNX Runtime: the very body an
                     export spliced in (``--export``), or one built for the sizes
``plugin_kernel``    the CUDA kernel (``plugin/``) through its ctypes test library,
                     timed with CUDA events, when a GPU and the library are there
=================== ===============================================================

PyTorch implementations also run on CUDA when torch sees a GPU. With a benchmark's
JSON (``--bench-json``), each time is also given as a share of that run's time to
first token at the same budget and batch size.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from fsr.bench.stats import ratio, summarize

KERNEL_LIBRARY = "libfsr_kernels_test.so"


def op_inputs(batch: int, n: int, d: int, f: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs with the statistics of real ones: peaked saliency, features in clusters."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(16, f).astype(np.float32)
    features = centers[rng.randint(0, 16, size=(batch, n))] + 0.5 * rng.randn(batch, n, f).astype(np.float32)
    logits = 2.0 * rng.randn(batch, n)
    saliency = np.exp(logits - logits.max(-1, keepdims=True))
    saliency /= saliency.sum(-1, keepdims=True)
    return {
        "tokens": rng.randn(batch, n, d).astype(np.float32),
        "features": features.astype(np.float32),
        "saliency": saliency.astype(np.float32),
        "relevance": rng.uniform(-0.2, 0.4, size=(batch, n)).astype(np.float32),
    }


def _time(fn, warmup: int, repeat: int, sync=lambda: None) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def _torch_cases(inputs, budget, fsr, warmup, repeat, with_reference=True):
    import torch

    from fsr.pruning.fsr_fixed import FocusScanRefineFixed
    from fsr.pruning.fsr_reference import focus_scan_refine_reference

    out = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fixed = FocusScanRefineFixed(budget, **fsr)
    for device in devices:
        t = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        args = (t["tokens"], t["features"], t["saliency"], t.get("relevance"))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.inference_mode():
            if with_reference:
                out[f"torch_reference_{device}"] = _time(
                    lambda: focus_scan_refine_reference(*args, budget=budget, **fsr), warmup, repeat, sync)
            out[f"torch_fixed_{device}"] = _time(lambda: fixed(*args), warmup, repeat, sync)
    if "cuda" not in devices:
        out["torch_fixed_cuda"] = {"status": "not measured: no GPU"}
    return out


def _ort_case(model, inputs, warmup, repeat) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)
    names = [i.name for i in session.get_inputs()]
    feeds = {n: inputs[n] for n in names}
    result = _time(lambda: session.run(None, feeds), warmup, repeat)
    result["provider"] = session.get_providers()[0]
    return result


def find_kernel_library(explicit: str | None = None) -> Path | None:
    candidates = [explicit, os.environ.get("FSR_KERNELS_LIB")]
    root = Path(__file__).resolve().parents[1]
    candidates += [root / "build" / "plugin" / KERNEL_LIBRARY, root / "plugin" / "build" / KERNEL_LIBRARY]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _gpu_present() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    return Path("/dev/nvidia0").exists()


def _plugin_case(inputs, budget, fsr, warmup, repeat, library: str | None) -> dict:
    if not _gpu_present():
        return {"status": "not measured: no GPU"}
    path = find_kernel_library(library)
    if path is None:
        return {"status": f"not measured: {KERNEL_LIBRARY} not found (build it: cmake -S plugin -B build/plugin "
                          "&& cmake --build build/plugin, or pass --kernel-lib / set FSR_KERNELS_LIB)"}
    lib = ctypes.CDLL(str(path))
    fn = lib.fsr_bench_host
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
    fn.argtypes = [ptr, i32, ptr, i32, ptr, ptr, i32, i32, i32, i32, i32, i32, f32, f32, f32, f32, i32, i32,
                   ctypes.POINTER(f32)]
    fn.restype = i32
    lib.fsr_error_string.restype = ctypes.c_char_p
    lib.fsr_error_string.argtypes = [i32]
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
    b, n, d = arrays["tokens"].shape
    f = arrays["features"].shape[2]
    times = (f32 * repeat)()
    relevance = arrays["relevance"].ctypes.data if "relevance" in arrays else None  # NULL: term omitted
    code = fn(arrays["tokens"].ctypes.data, 0, arrays["features"].ctypes.data, 0, arrays["saliency"].ctypes.data,
              relevance, 0, b, n, d, f, budget, fsr.get("alpha", 3.0), fsr.get("beta", 1.0), fsr.get("rho", 0.9),
              fsr.get("kappa", 1.0), warmup, repeat, times)
    if code != 0:
        return {"status": f"failed: {lib.fsr_error_string(code).decode()} (code {code})", "library": str(path)}
    result = summarize(list(times))
    result["library"] = str(path)
    result["timer"] = "CUDA events, inputs resident on the device"
    return result


def _op_model_from_export(export_dir: Path):
    import onnx

    from fsr.bench.split import fsr_op_model
    from fsr.manifest import read_manifest

    manifest = read_manifest(export_dir)  # an export without a FocusScanRefine node: SplitError
    model = fsr_op_model(onnx.load(manifest.resolve(export_dir, manifest.graph("vision").file)))
    return model, manifest


def bench_op(*, batch: int = 1, n: int = 576, d: int = 4096, f: int = 1024, budget: int = 64, warmup: int = 2,
             repeat: int = 10, fsr: dict | None = None, export_dir: Path | None = None, bench_json: dict | None = None,
             kernel_lib: str | None = None, reference: bool = True) -> dict:
    """Time the op in every implementation; with ``bench_json`` also its share of TTFT there."""
    fsr = {k: float(v) for k, v in (fsr or {}).items() if k in ("alpha", "beta", "rho", "kappa")}
    onnx_source = None
    model = None
    if export_dir is not None:
        model, manifest = _op_model_from_export(Path(export_dir))
        shapes = {i.name: [dim.dim_value for dim in i.type.tensor_type.shape.dim] for i in model.graph.input}
        n, d = shapes["tokens"][1], shapes["tokens"][2]
        f = shapes["features"][2]
        settings = manifest.method.settings
        budget, fsr = settings["budget"], {k: float(settings[k]) for k in ("alpha", "beta", "rho", "kappa")}
        onnx_source = f"function body of {export_dir}/vision.onnx"
    inputs = op_inputs(batch, n, d, f)
    if model is not None and "relevance" not in {i.name for i in model.graph.input}:
        inputs.pop("relevance")
    results = _torch_cases(inputs, budget, fsr, warmup, repeat, with_reference=reference)
    if model is None:
        from fsr.pruning.onnx_function import make_fsr_model

        model = make_fsr_model(budget=budget, num_tokens=n, token_dim=d, feature_dim=f, **fsr)
        onnx_source = "function body built for these sizes (make_fsr_model)"
    results["onnxruntime"] = {**_ort_case(model, inputs, warmup, repeat), "model": onnx_source}
    results["plugin_kernel"] = _plugin_case(inputs, budget, fsr, warmup, repeat, kernel_lib)
    doc = {"schema": "fsr-bench-op/1", "batch": batch, "num_tokens": n, "token_dim": d, "feature_dim": f,
           "budget": budget, "fsr": fsr, "warmup": warmup, "repeat": repeat, "implementations": results}
    if bench_json is not None:
        doc["ttft"] = share_of_ttft(doc, bench_json)
    return doc


def share_of_ttft(op_doc: dict, bench: dict) -> dict:
    """Each implementation's median as a share of the benchmark's TTFT at the same budget and batch."""
    match = [r for r in bench["results"] if r["kept_tokens"] == op_doc["budget"] and r["batch"] == op_doc["batch"]
             and r["method"] == "fsr"]  # a benchmark may hold other methods at the same budget
    if not match:
        return {"status": f"the benchmark has no row at budget {op_doc['budget']}, batch {op_doc['batch']}"}
    row = match[0]
    ttft = row["timings_ms"]["ttft"]["median"]
    shares = {name: ratio(res.get("median"), ttft) for name, res in op_doc["implementations"].items()
              if res.get("median") is not None}
    return {"ttft_ms": ttft, "backend": bench["backend"], "in_pipeline_fsr_op_ms": row["timings_ms"]["fsr_op"]["median"],
            "in_pipeline_share": row["fsr_op_share_of_ttft"], "shares": shares}


def op_defaults_from_bench(bench: dict, budget: int, batch: int) -> dict:
    """Sizes (and the FSR export, when the benchmark used one) of a benchmark's model."""
    model = bench["model"]
    out = {"n": model["num_image_tokens"], "d": model["token_dim"], "f": model["feature_dim"]}
    for e in bench.get("exports", []):
        if e.get("method") == "fsr" and e.get("kept_tokens") == budget and e.get("path"):
            out["export_dir"] = Path(e["path"])
    return out


def markdown(doc: dict) -> str:
    lines = [f"FocusScanRefine alone: batch {doc['batch']}, N={doc['num_tokens']}, D={doc['token_dim']}, "
             f"F={doc['feature_dim']}, budget {doc['budget']} ({doc['warmup']} warm-up + {doc['repeat']} runs)", "",
             "| implementation | median ms | IQR ms | share of TTFT |", "|---|---:|---:|---:|"]
    shares = (doc.get("ttft") or {}).get("shares", {})
    for name, res in doc["implementations"].items():
        if res.get("median") is None:
            lines.append(f"| {name} | {res.get('status', '–')} | | |")
            continue
        share = shares.get(name)
        lines.append(f"| {name} | {res['median']:.2f} | {res['q1']:.2f}–{res['q3']:.2f} | "
                     f"{'–' if share is None else f'{100 * share:.1f} %'} |")
    ttft = doc.get("ttft")
    if ttft and "ttft_ms" in ttft:
        inside = ttft["in_pipeline_share"]
        lines += ["", f"TTFT at this budget and batch ({ttft['backend']} benchmark): {ttft['ttft_ms']:.1f} ms; "
                      f"the op timed alone in that run: {ttft['in_pipeline_fsr_op_ms']:.2f} ms = "
                      f"{'–' if inside is None else f'{100 * inside:.1f} %'} of TTFT."]
    return "\n".join(lines) + "\n"
