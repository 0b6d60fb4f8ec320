"""Graph-by-graph accuracy: the PyTorch reference against ONNX Runtime (and TensorRT).

For each graph of an export::

    runners = [ReferenceRunner(reference, manifest, graph), OnnxrtRunner(SessionFromOnnx(graph.onnx))]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)],
                                           compare_func=SimpleCompareFunc(atol={...}, rtol={...}))

The back end is compared *against* the reference (pair (1, 0)): Polygraphy's relative
error is relative to the second result, so it is relative to the reference, exactly as
in ``polygraphy run graph.onnx --onnxrt --load-outputs torch_outputs.json``, whose live
run comes first and the loaded (reference) run second.

Files written per graph, all in Polygraphy's own JSON format, under ``OUT/<graph>/``:
``inputs.json`` (a list of feed dicts, ``--load-inputs``), ``torch_outputs.json`` (the
reference's ``RunResults``, ``--load-outputs``) and ``<backend>_outputs.json``.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.json import save_json

from fsr.compare.near_tie import explain_kept
from fsr.compare.reference_runner import ReferenceRunner
from fsr.compare.tolerances import Tolerance, ToleranceTable
from fsr.compare.trt import EngineRunner, engine_command_flags, engine_entry
from fsr.manifest import Manifest

PASS, FAIL, NEAR_TIE, SKIPPED, ERROR = "pass", "fail", "near-tie", "skipped", "error"
BACKEND_LABELS = {"ort": "onnxrt", "trt": "tensorrt"}
REFERENCE_NAME = "torch"


@dataclasses.dataclass
class OutputResult:
    output: str
    iteration: int
    status: str
    atol: float
    rtol: float
    max_absdiff: float | None = None
    max_reldiff: float | None = None
    mean_absdiff: float | None = None
    reference_max_abs: float | None = None
    shape: list[int] | None = None
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphResult:
    graph: str
    backend: str
    status: str
    reason: str = ""
    outputs: list[OutputResult] = dataclasses.field(default_factory=list)
    near_ties: list[dict] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    command: str | None = None
    seconds: float = 0.0

    @property
    def failed_outputs(self) -> list[str]:
        return sorted({o.output for o in self.outputs if o.status == FAIL})

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["failed_outputs"] = self.failed_outputs
        return d


def _status(passed: bool) -> str:
    return PASS if passed else FAIL


def _elementwise_ok(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> bool:
    """Polygraphy's ``elemwise`` rule: each element within atol or within rtol of the reference."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(got - ref)
    ref_abs = np.abs(ref)
    ref_abs[ref_abs == 0] = 2.220446049250313e-16
    bad = ((diff > tol.atol) | np.isnan(diff)) & ((diff / ref_abs > tol.rtol) | np.isnan(diff))
    return not bool(bad.any())


def polygraphy_command(model_path: Path, backend: str, inputs: Path, reference_outputs: Path,
                       tolerances: dict[str, Tolerance], default: Tolerance, extra_flags: list[str] | None = None,
                       env: str = "") -> str:
    """The ``polygraphy run`` command that repeats one comparison by hand."""
    flags = ["--onnxrt"] if backend == "ort" else list(extra_flags or ["--trt"])
    atol = [f"{default.atol:g}"] + [f"{n}:{t.atol:g}" for n, t in tolerances.items() if t.atol != default.atol]
    rtol = [f"{default.rtol:g}"] + [f"{n}:{t.rtol:g}" for n, t in tolerances.items() if t.rtol != default.rtol]
    parts = ["polygraphy", "run", str(model_path), *flags, "--load-inputs", str(inputs),
             "--load-outputs", str(reference_outputs), "--atol", *atol, "--rtol", *rtol]
    return (f"{env} " if env else "") + " ".join(shlex.quote(p) for p in parts)


def backend_runner(backend: str, export_dir: Path, manifest: Manifest, graph: str):
    """The Polygraphy runner of ``graph`` on ``backend``, and (model path, flags, env) for its command."""
    if backend == "ort":
        path = manifest.resolve(export_dir, manifest.graph(graph).file).resolve()
        return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=BACKEND_LABELS[backend]), \
            (path, ["--onnxrt"], "")
    if backend == "trt":
        env, flags, path = engine_command_flags(export_dir, engine_entry(export_dir, manifest, graph))
        return EngineRunner(export_dir, manifest, graph, name=BACKEND_LABELS[backend]), (Path(path), flags, env)
    raise ValueError(f"unknown backend {backend!r} (graph comparisons know ort, trt)")


def compare_graph(export_dir: Path, manifest: Manifest, reference, graph: str, backend: str, feeds: list[dict],
                  table: ToleranceTable, out_dir: Path, *, near_tie_tol: float) -> GraphResult:
    """Run the reference and ``backend`` on ``feeds`` through Polygraphy and judge every output."""
    start = time.perf_counter()
    output_names = manifest.graph(graph).output_names
    tolerances = table.for_outputs(output_names)
    label = BACKEND_LABELS[backend]
    runner, (model_path, flags, env) = backend_runner(backend, export_dir, manifest, graph)
    runners = [ReferenceRunner(reference, manifest, graph, name=REFERENCE_NAME), runner]
    results = Comparator.run(runners, data_loader=feeds)

    folder = Path(out_dir) / graph
    folder.mkdir(parents=True, exist_ok=True)
    files = {"inputs": folder / "inputs.json", "reference_outputs": folder / "torch_outputs.json",
             "backend_outputs": folder / f"{backend}_outputs.json"}
    save_json(feeds, str(files["inputs"]), description="inputs")
    RunResults([(REFERENCE_NAME, results[REFERENCE_NAME])]).save(str(files["reference_outputs"]))
    RunResults([(label, results[label])]).save(str(files["backend_outputs"]))

    compare_func = SimpleCompareFunc(atol={n: t.atol for n, t in tolerances.items()},
                                     rtol={n: t.rtol for n, t in tolerances.items()}, check_error_stat="elemwise")
    accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)], compare_func=compare_func)
    per_iteration = accuracy[0][(label, REFERENCE_NAME)]

    result = GraphResult(graph, backend, PASS, files={k: str(v.resolve()) for k, v in files.items()},
                         command=polygraphy_command(model_path, backend, files["inputs"].resolve(),
                                                    files["reference_outputs"].resolve(), tolerances,
                                                    table("*"), flags, env))
    for it, compared in enumerate(per_iteration):
        ref_it, got_it = results[REFERENCE_NAME][it], results[label][it]
        rows_excused: set[int] = set()
        kept_differ = "kept_indices" in compared and not bool(compared["kept_indices"])
        if kept_differ:  # judged exactly, with near-ties explained
            rows_excused = _judge_kept(result, reference, manifest, feeds[it], ref_it["kept_indices"],
                                       got_it["kept_indices"], it, near_tie_tol)
        for name in output_names:
            if name == "kept_indices" and kept_differ:
                continue
            r = compared.get(name)
            ref = ref_it[name]
            out = OutputResult(name, it, _status(bool(r)) if r is not None else FAIL, tolerances[name].atol,
                               tolerances[name].rtol, shape=list(ref.shape),
                               reference_max_abs=float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0)
            if r is not None:
                out.max_absdiff, out.max_reldiff, out.mean_absdiff = r.max_absdiff, r.max_reldiff, r.mean_absdiff
            else:
                out.note = f"{label} did not produce this output"
            if rows_excused and out.status == FAIL and r is not None:  # rows that kept other tokens
                keep = [b for b in range(ref.shape[0]) if b not in rows_excused] if ref.ndim else []
                if not keep:
                    out.status, out.note = NEAR_TIE, "follows a near-tie in kept_indices (other tokens kept)"
                elif _elementwise_ok(got_it[name][keep], ref[keep], tolerances[name]):
                    out.status, out.note = NEAR_TIE, f"rows {sorted(rows_excused)} follow a near-tie in " \
                                                     "kept_indices; the other rows are within tolerance"
            result.outputs.append(out)

    statuses = {o.status for o in result.outputs}
    result.status = FAIL if FAIL in statuses else NEAR_TIE if NEAR_TIE in statuses else PASS
    if result.status == FAIL:
        result.reason = f"outside tolerance: {', '.join(result.failed_outputs)}"
    elif result.status == NEAR_TIE:
        result.reason = "kept_indices differ only at near-ties of the method's scores; the command above " \
                        "reports them as a mismatch"
    result.seconds = time.perf_counter() - start
    return result


def _judge_kept(result: GraphResult, reference, manifest, feed, ref_kept, got_kept, iteration: int,
                tol: float) -> set[int]:
    """Explain differing kept_indices rows; record the verdict. Returns the rows excused as near-ties."""
    pipe = reference() if callable(reference) else reference
    same_shape = np.shape(ref_kept) == np.shape(got_kept)
    verdicts = explain_kept(pipe, manifest, feed, ref_kept, got_kept, tol, graph=result.graph) if same_shape else []
    differing = int((np.asarray(ref_kept) != np.asarray(got_kept)).any(axis=-1).sum()) if same_shape else -1
    all_ties = same_shape and bool(verdicts) and all(v.near_tie for v in verdicts)
    result.near_ties.extend({"iteration": iteration, **v.to_json()} for v in verdicts)
    note = (f"{differing} row(s) differ: " + "; ".join(f"row {v.row}: {v.detail}" for v in verdicts)
            if same_shape else f"shapes differ: {np.shape(ref_kept)} vs {np.shape(got_kept)}")
    result.outputs.append(OutputResult(
        "kept_indices", iteration, NEAR_TIE if all_ties else FAIL, 0.0, 0.0,
        max_absdiff=float(np.abs(np.asarray(ref_kept) - np.asarray(got_kept)).max()) if same_shape else None,
        shape=list(np.shape(ref_kept)), note=note))
    return {v.row for v in verdicts} if all_ties else set()


def skipped(graph: str, backend: str, reason: str) -> GraphResult:
    return GraphResult(graph, backend, SKIPPED, reason)


def errored(graph: str, backend: str, exc: BaseException) -> GraphResult:
    return GraphResult(graph, backend, ERROR, f"{type(exc).__name__}: {exc}")
