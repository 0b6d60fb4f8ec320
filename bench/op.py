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

Inputs (``op_inputs``): ``bench`` has the statistics the benchmark always used (a softmax of
Gaussian logits: with rho = 0.9 the focus set fills the budget, so Scan takes no step);
``peaky`` puts nearly all saliency on a few tokens, so K_F is small and Scan takes almost
K steps, the costly case.

``scaling_rows`` (``python bench/op.py scaling ...``) measures what the op costs to build and
to run per budget and N: the table of ``bench/README.md``. It runs against whichever
``fsr`` is installed, so the same file measures an older checkout too (its venv's python).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

import json

from fsr.bench.stats import ratio, summarize

KERNEL_LIBRARY = "libfsr_kernels_test.so"


INPUT_KINDS = ("bench", "peaky")


def op_inputs(batch: int, n: int, d: int, f: int, seed: int = 0, kind: str = "bench") -> dict[str, np.ndarray]:
    """Random inputs: ``bench`` (softmax saliency, features in 16 clusters) or ``peaky``
    (the same, with all saliency but a floor on 40 tokens per row: Scan runs)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; one of {INPUT_KINDS}")
    rng = np.random.RandomState(seed)
    centers = rng.randn(16, f).astype(np.float32)
    features = centers[rng.randint(0, 16, size=(batch, n))] + 0.5 * rng.randn(batch, n, f).astype(np.float32)
    logits = 2.0 * rng.randn(batch, n)
    saliency = np.exp(logits - logits.max(-1, keepdims=True))
    saliency /= saliency.sum(-1, keepdims=True)
    out = {
        "tokens": rng.randn(batch, n, d).astype(np.float32),
        "features": features.astype(np.float32),
        "saliency": saliency.astype(np.float32),
        "relevance": rng.uniform(-0.2, 0.4, size=(batch, n)).astype(np.float32),
    }
    if kind == "peaky":
        peaky = np.random.RandomState(seed + 1)
        saliency = peaky.rand(batch, n).astype(np.float32) * 1e-3
        for row in range(batch):
            saliency[row, peaky.choice(n, min(40, n), replace=False)] = 1 + peaky.rand(min(40, n))
        out["saliency"] = saliency
    return out


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


def _ort_session(model):
    """A session that does not keep its threads spinning after a run (they would steal the
    CPU from the PyTorch timings that follow)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)


def _ort_case(model, inputs, warmup, repeat) -> dict:
    session = _ort_session(model)
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
    fn.argtypes = [ptr, i32, ptr, i32, ptr, ptr, i32, i32, i32, i32, i32, i32, f32, f32, f32, f32, f32, i32, i32,
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
              relevance, 0, b, n, d, f, budget, *(_attribute(fsr, k) for k in ("alpha", "beta", "rho", "kappa",
                                                                                 "keep_ratio")),
              warmup, repeat, times)
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


def _float_attributes() -> tuple[str, ...]:
    from fsr.pruning.fsr_identity import FSR_ATTRIBUTES

    return tuple(a for a in FSR_ATTRIBUTES if a != "budget")


def _attribute(fsr: dict, name: str) -> float:
    from fsr.pruning.fsr_identity import FSR_ATTRIBUTE_DEFAULTS

    return float(fsr.get(name, FSR_ATTRIBUTE_DEFAULTS[name]))


def bench_op(*, batch: int = 1, n: int = 576, d: int = 4096, f: int = 1024, budget: int = 64, warmup: int = 2,
             repeat: int = 10, fsr: dict | None = None, export_dir: Path | None = None, bench_json: dict | None = None,
             kernel_lib: str | None = None, reference: bool = True, inputs: str = "bench") -> dict:
    """Time the op in every implementation; with ``bench_json`` also its share of TTFT there."""
    fsr = {k: float(v) for k, v in (fsr or {}).items() if k in _float_attributes()}
    onnx_source = None
    model = None
    if export_dir is not None:
        model, manifest = _op_model_from_export(Path(export_dir))
        shapes = {i.name: [dim.dim_value for dim in i.type.tensor_type.shape.dim] for i in model.graph.input}
        n, d = shapes["tokens"][1], shapes["tokens"][2]
        f = shapes["features"][2]
        settings = manifest.method.settings
        budget = settings["budget"]
        fsr = {k: float(settings[k]) for k in _float_attributes() if settings.get(k) is not None}
        onnx_source = f"function body of {export_dir}/vision.onnx"
    values = op_inputs(batch, n, d, f, kind=inputs)
    if model is not None and "relevance" not in {i.name for i in model.graph.input}:
        values.pop("relevance")
    results = _torch_cases(values, budget, fsr, warmup, repeat, with_reference=reference)
    if model is None:
        from fsr.pruning.onnx_function import make_fsr_model

        model = make_fsr_model(budget=budget, token_dim=d, feature_dim=f, **fsr)
        onnx_source = "the op's function body (make_fsr_model, dynamic N)"
    results["onnxruntime"] = {**_ort_case(model, values, warmup, repeat), "model": onnx_source}
    results["plugin_kernel"] = _plugin_case(values, budget, fsr, warmup, repeat, kernel_lib)
    doc = {"schema": "fsr-bench-op/1", "batch": batch, "num_tokens": n, "token_dim": d, "feature_dim": f,
           "budget": budget, "fsr": fsr, "inputs": inputs, "warmup": warmup, "repeat": repeat,
           "implementations": results}
    if bench_json is not None:
        doc["ttft"] = share_of_ttft(doc, bench_json)
    return doc


def share_of_ttft(op_doc: dict, bench: dict) -> dict:
    """Each implementation's median as a share of the benchmark's TTFT at the same budget and batch."""
    match = [r for r in bench["results"] if r["kept_tokens"] == op_doc["budget"] and r["batch"] == op_doc["batch"]]
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


# --------------------------------------------------------------------------- build and run cost per budget


def _count_nodes(nodes) -> int:
    """Nodes of a graph or function body, loop bodies included."""
    import onnx

    total = 0
    for node in nodes:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _count_nodes(attr.g.node)
    return total


def _time_runs(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def scaling_row(*, n: int, budget: int, d: int = 4096, f: int = 1024, warmup: int = 1, repeat: int = 3,
                kinds: tuple[str, ...] = INPUT_KINDS, torch_impls: tuple[str, ...] = ("fixed", "reference"),
                save_model: Path | None = None) -> dict:
    """What one budget costs at N tokens with the installed ``fsr``: seconds to build the op's
    ONNX model, nodes in its function body (loop bodies included), ONNX Runtime session
    seconds, and the op's median ms in ONNX Runtime and PyTorch (CPU) on each input kind.

    Works with the specialised bodies of older checkouts (``build_fsr_function`` taking
    ``num_tokens``: a model per budget and N) and with the operator body (one for all).
    """
    import inspect

    import torch

    from fsr.pruning import FocusScanRefineFixed, focus_scan_refine_reference
    from fsr.pruning.onnx_function import build_fsr_function, make_fsr_model

    specialised = "num_tokens" in inspect.signature(build_fsr_function).parameters
    start = time.perf_counter()
    if specialised:
        model = make_fsr_model(budget=budget, num_tokens=n, token_dim=d, feature_dim=f)
    else:
        model = make_fsr_model(budget=budget, token_dim=d, feature_dim=f, function=build_fsr_function())
    build_s = time.perf_counter() - start
    if save_model is not None:
        import onnx

        onnx.save(model, save_model)
    start = time.perf_counter()
    session = _ort_session(model)
    session_s = time.perf_counter() - start
    row = {"num_tokens": n, "budget": budget, "token_dim": d, "feature_dim": f,
           "body": "specialised" if specialised else "operator", "build_s": build_s,
           "body_nodes": _count_nodes(model.functions[0].node), "session_s": session_s, "ms": {}}
    fixed = FocusScanRefineFixed(budget)
    for kind in kinds:
        values = op_inputs(1, n, d, f, kind=kind)
        tensors = [torch.from_numpy(values[k]) for k in ("tokens", "features", "saliency", "relevance")]
        row["ms"][f"onnxruntime/{kind}"] = _time_runs(lambda: session.run(None, values), warmup, repeat)
        with torch.inference_mode():
            if "fixed" in torch_impls:
                row["ms"][f"torch_fixed/{kind}"] = _time_runs(lambda: fixed(*tensors), warmup, repeat)
            if "reference" in torch_impls:
                row["ms"][f"torch_reference/{kind}"] = _time_runs(
                    lambda: focus_scan_refine_reference(*tensors, budget=budget), min(warmup, 1), repeat)
    return row


def _load_pruning(tree: Path):
    """The ``pruning/`` package of another checkout, importable beside this one (``fsr_before.pruning``)."""
    import importlib.util
    import sys

    name = "fsr_before_pruning"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(tree) / "pruning" / "__init__.py",
                                                  submodule_search_locations=[str(Path(tree) / "pruning")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interleaved_rows(*, before_tree: Path, before_models: Path, ns, budgets, d: int = 4096, f: int = 1024,
                     repeat: int = 5, kinds: tuple[str, ...] = INPUT_KINDS) -> list[dict]:
    """Before and after in one process, run *i* of each implementation before run *i + 1* of any
    (so load changes hit both alike): ONNX Runtime on the saved 'before' models and on the
    operator body, the PyTorch fixed module and reference of ``before_tree`` and of this checkout.
    Returns one row per (N, budget) with every time's median and minimum."""
    import torch

    import onnx

    from fsr.pruning import FocusScanRefineFixed, focus_scan_refine_reference
    from fsr.pruning.onnx_function import build_fsr_function, make_fsr_model

    old = _load_pruning(before_tree)
    function = build_fsr_function()
    rows = []
    for n in ns:
        for budget in budgets:
            new_model = make_fsr_model(budget=budget, token_dim=d, feature_dim=f, function=function)
            runs = {"onnxruntime/after": _ort_session(new_model).run,
                    "onnxruntime/before": _ort_session(onnx.load(Path(before_models) / f"fsr_n{n}_b{budget}.onnx")).run}
            fixed_new, fixed_old = FocusScanRefineFixed(budget), old.FocusScanRefineFixed(budget)
            times: dict[str, list[float]] = {}
            for kind in kinds:
                values = op_inputs(1, n, d, f, kind=kind)
                tensors = [torch.from_numpy(values[k]) for k in ("tokens", "features", "saliency", "relevance")]
                calls = {
                    f"onnxruntime/{kind}/after": lambda: runs["onnxruntime/after"](None, values),
                    f"onnxruntime/{kind}/before": lambda: runs["onnxruntime/before"](None, values),
                    f"torch_fixed/{kind}/after": lambda: fixed_new(*tensors),
                    f"torch_fixed/{kind}/before": lambda: fixed_old(*tensors),
                    f"torch_reference/{kind}/after": lambda: focus_scan_refine_reference(*tensors, budget=budget),
                    f"torch_reference/{kind}/before": lambda: old.focus_scan_refine_reference(*tensors, budget=budget),
                }
                with torch.inference_mode():
                    for call in calls.values():  # warm-up
                        call()
                    for _ in range(repeat):
                        for name, call in calls.items():
                            start = time.perf_counter()
                            call()
                            times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            row = {"num_tokens": n, "budget": budget, "token_dim": d, "feature_dim": f, "repeat": repeat,
                   "median_ms": {k: float(np.median(v)) for k, v in times.items()},
                   "min_ms": {k: float(min(v)) for k, v in times.items()}, "load_average": __import__("os").getloadavg()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def scaling_markdown(before: list[dict], after: list[dict], interleaved: list[dict] | None = None) -> str:
    """The before / after table of ``bench/README.md``: build cost from `scaling_row` results of
    each checkout; op times from ``interleaved`` (`interleaved_rows`, both measured in one run)
    when given, else from the two scaling runs."""
    def key(row):
        return row["num_tokens"], row["budget"]

    old = {key(r): r for r in before}
    both = {key(r): r for r in interleaved or []}

    def ms(row, impl, kind, side):
        if both:
            value = both.get(key(row), {}).get("median_ms", {}).get(f"{impl}/{kind}/{side}")
        else:
            value = ((old.get(key(row)) if side == "before" else row) or {}).get("ms", {}).get(f"{impl}/{kind}")
        return "–" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"

    def num(r, name, fmt):
        return "–" if r is None or r.get(name) is None else format(r[name], fmt)

    lines = ["| N | budget (K) | build s | body nodes | ORT session s | ORT ms, bench inputs | ORT ms, peaky inputs "
             "| PyTorch fixed ms, bench / peaky | PyTorch reference ms, bench / peaky |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(after, key=key):
        b = old.get(key(row))
        k = min(row["budget"], row["num_tokens"])
        pair = lambda impl, kind: f"{ms(row, impl, kind, 'before')} → {ms(row, impl, kind, 'after')}"  # noqa: E731
        lines.append(
            f"| {row['num_tokens']} | {row['budget']} ({k}) | {num(b, 'build_s', '.1f')} → {row['build_s']:.2f} "
            f"| {num(b, 'body_nodes', 'd')} → {row['body_nodes']} | {num(b, 'session_s', '.2f')} → {row['session_s']:.2f} "
            f"| {pair('onnxruntime', 'bench')} | {pair('onnxruntime', 'peaky')} "
            f"| {ms(row, 'torch_fixed', 'bench', 'before')} / {ms(row, 'torch_fixed', 'peaky', 'before')} → "
            f"{ms(row, 'torch_fixed', 'bench', 'after')} / {ms(row, 'torch_fixed', 'peaky', 'after')} "
            f"| {ms(row, 'torch_reference', 'bench', 'before')} / {ms(row, 'torch_reference', 'peaky', 'before')} → "
            f"{ms(row, 'torch_reference', 'bench', 'after')} / {ms(row, 'torch_reference', 'peaky', 'after')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python bench/op.py scaling --n 576,2880 --budgets 64,192,320,640 --jsonl out.jsonl``:
    one `scaling_row` per (N, budget), each appended to the JSON-lines file as it finishes.
    ``python bench/op.py interleaved --before-tree OLD --before-models DIR --jsonl both.jsonl``: op times
    of both checkouts in one run. ``python bench/op.py table --before before.jsonl --after after.jsonl
    [--jsonl both.jsonl]``: the markdown table."""
    import argparse
    import json
    import os as _os

    parser = argparse.ArgumentParser(prog="bench/op.py", description=main.__doc__)
    parser.add_argument("mode", choices=["scaling", "table", "interleaved"])
    parser.add_argument("--save-models", type=Path, help="scaling: keep each built model here as fsr_n<N>_b<budget>.onnx")
    parser.add_argument("--before-tree", type=Path, help="interleaved: checkout whose pruning/ is the 'before' PyTorch code")
    parser.add_argument("--before-models", type=Path, help="interleaved: the --save-models folder of a 'before' run")
    parser.add_argument("--n", default="576,2880")
    parser.add_argument("--budgets", default="64,192,320,640")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--f", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(INPUT_KINDS))
    parser.add_argument("--torch", default="fixed,reference", help="PyTorch implementations to time ('' for none)")
    parser.add_argument("--jsonl", type=Path)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path)
    args = parser.parse_args(argv)
    if args.mode == "table":
        def read(path):
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

        both = read(args.jsonl) if args.jsonl is not None and args.jsonl.exists() else None
        print(scaling_markdown(read(args.before), read(args.after), both), end="")
        return 0
    if args.jsonl is None:
        parser.error(f"{args.mode} needs --jsonl")
    if args.mode == "interleaved":
        rows = interleaved_rows(before_tree=args.before_tree, before_models=args.before_models,
                                ns=tuple(map(int, args.n.split(","))), budgets=tuple(map(int, args.budgets.split(","))),
                                d=args.d, f=args.f, repeat=args.repeat, kinds=tuple(args.kinds.split(",")))
        with open(args.jsonl, "a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
        return 0
    if args.save_models is not None:
        args.save_models.mkdir(parents=True, exist_ok=True)
    for n in map(int, args.n.split(",")):
        for budget in map(int, args.budgets.split(",")):
            saved = None if args.save_models is None else args.save_models / f"fsr_n{n}_b{budget}.onnx"
            row = scaling_row(n=n, budget=budget, d=args.d, f=args.f, repeat=args.repeat,
                              kinds=tuple(args.kinds.split(",")), torch_impls=tuple(filter(None, args.torch.split(","))),
                              save_model=saved)
            row["load_average"] = _os.getloadavg()
            with open(args.jsonl, "a") as out:
                out.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
