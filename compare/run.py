"""``compare_export``: every comparison of one export, as one JSON-able report.

    report = compare_export("exports/llava-tiny-fsr-b64", CompareOptions(out_dir=Path("cmp")))
    report["passed"], report["failures"]

Three parts, each optional:

1. graph by graph (``graphs.compare_graph``): PyTorch reference vs ONNX Runtime / TensorRT
   through Polygraphy, with the ``polygraphy run`` command that repeats each comparison;
2. end to end (``end_to_end.compare_backend``): greedy generation per back end;
3. pruning fidelity (``fidelity.pruning_fidelity``): agreement and KL per method and budget.

``passed`` is False when any graph output is outside its tolerance (near-ties of the
method's ``kept_indices`` excepted), when a comparison could not run on a back end that is
available, when a generated sequence differs from the reference other than at a
near-tie, or when a fidelity row the method calls its identity (a budget >= N image tokens,
`PruningMethod.is_identity`) does not reproduce the unpruned model exactly. Skipped
comparisons (TensorRT without a GPU) do not fail, and the report lists them (``skipped``);
when every back end asked for is skipped, nothing would be compared and `compare_export`
refuses before running (`CompareError`), as it does when every part is switched off.

Polygraphy's input/output files go to ``out_dir``, by default ``EXPORT/compare/`` (beside
``EXPORT/engines/``), never into the working folder.

The export is verified first, as ``fsr-run`` does (every hash in the manifest): an altered
file stops the comparison with the integrity message. ``verify=False`` compares an export
whose graphs were changed on purpose; the changed files are then listed as warnings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable

from polygraphy.logger import G_LOGGER

from fsr.compare import end_to_end, graphs
from fsr.compare.errors import CompareError
from fsr.compare.feeds import graph_feeds
from fsr.compare.fidelity import pruning_fidelity
from fsr.compare.graphs import ERROR, FAIL, SKIPPED
from fsr.compare.reference_runner import ReferenceFromExport
from fsr.compare.samples import make_samples
from fsr.compare.tolerances import (
    LOGIT_NEAR_TIE_DEFAULTS, NEAR_TIE_DEFAULTS, Tolerance, ToleranceTable,
)
from fsr.compare.trt import unavailable_reason
from fsr.engines.records import select_engine
from fsr.manifest import Manifest, ManifestError, read_manifest, sha256
from fsr.pruning.methods import get_method

BACKENDS = ("torch", "ort", "trt")


@dataclasses.dataclass
class CompareOptions:
    backends: tuple[str, ...] = BACKENDS  # "torch" is the reference and always runs
    graphs: tuple[str, ...] | None = None  # None: every graph of the export
    budgets: tuple[int, ...] | None = None  # None: the image's token count (the identity), then DEFAULT_BUDGETS
    methods: tuple[str, ...] | None = None  # pruning methods for fidelity; None: all available
    tolerances: dict[str, Tolerance] = dataclasses.field(default_factory=dict)  # pattern -> overrides
    out_dir: Path | None = None  # Polygraphy JSON files; None: EXPORT/compare
    graph_checks: bool = True
    end_to_end: bool = True
    fidelity: bool = True
    images: tuple = ()
    prompts: tuple[str, ...] = ()
    builtin_samples: int = 3
    max_new_tokens: int = 12
    near_tie_tol: float | None = None  # None: per precision (tolerances.NEAR_TIE_DEFAULTS)
    logit_tol: float | None = None  # None: per precision (tolerances.LOGIT_NEAR_TIE_DEFAULTS)
    seed: int = 0
    verbose: bool = False
    verify: bool = True  # check every hash first (False: changed files become warnings)


def _noop(message: str) -> None:
    pass


def check_integrity(export_dir: Path, manifest: Manifest) -> list[str]:
    """Files whose hash differs from the manifest (warnings, with ``verify=False``)."""
    changed = []
    records = [(name, f) for name, entry in manifest.graphs.items() for f in entry.files]
    records += [("source", f) for f in manifest.source.files]
    for name, record in records:
        path = manifest.resolve(export_dir, record.path)
        if not path.is_file():
            changed.append(f"{name}: {record.path} is missing")
        elif sha256(path) != record.sha256:
            changed.append(f"{name}: {record.path} changed since export (hash differs from manifest.json)")
    return changed


def _validate(options: CompareOptions, manifest: Manifest) -> None:
    unknown = [b for b in options.backends if b not in BACKENDS]
    if unknown:
        raise CompareError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if options.graphs:
        missing = [g for g in options.graphs if g not in manifest.graphs]
        if missing:
            raise CompareError(f"the export has no graph(s) {missing}; it has {', '.join(manifest.graphs)}")
    if options.budgets is not None and any(b < 1 for b in options.budgets):
        raise CompareError(f"budgets must be >= 1 (got {list(options.budgets)})")
    if options.max_new_tokens < 1:
        raise CompareError("--max-new-tokens must be >= 1")
    if not (options.graph_checks or options.end_to_end or options.fidelity):
        raise CompareError("nothing to compare: graph checks, end to end and fidelity are all switched off")
    if not (options.fidelity or [b for b in options.backends if b != "torch"]):
        raise CompareError("nothing to compare: --backends names no back end besides the torch reference and the "
                           "fidelity report is off; add --backends ort (or trt), or keep --fidelity")


def default_out_dir(export_dir: Path) -> Path:
    """Where Polygraphy's files go without ``out_dir``: inside the export, beside engines/."""
    return Path(export_dir) / "compare"


def check_backends(backends: list[str], trt_reason: str | None, options: CompareOptions) -> None:
    """Refuse a run whose back-end comparisons would all be skipped (nothing would be compared)."""
    if not backends or not (options.graph_checks or options.end_to_end):
        return
    if all(b == "trt" for b in backends) and trt_reason:
        also = "; --backends torch gives the pruning-fidelity report alone" if options.fidelity else ""
        raise CompareError(f"nothing to compare: TensorRT cannot run here: {trt_reason}. Compare with --backends ort "
                           f"on this machine, or run on a GPU machine after fsr-build{also}")


@contextlib.contextmanager
def _polygraphy_quiet(verbose: bool):
    if verbose:
        yield
        return
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def compare_export(export_dir, options: CompareOptions | None = None,
                   progress: Callable[[str], None] = _noop) -> dict:
    """Run the comparisons ``options`` asks for; return the report (see the module docstring)."""
    options = options or CompareOptions()
    start = time.perf_counter()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    _validate(options, manifest)
    if options.verify:
        progress("checking file hashes")
        manifest.verify(export_dir)
    dtype = manifest.dtype
    table = ToleranceTable(dtype, options.tolerances)
    near_tie_tol = options.near_tie_tol if options.near_tie_tol is not None else NEAR_TIE_DEFAULTS[dtype]
    logit_tol = options.logit_tol if options.logit_tol is not None else LOGIT_NEAR_TIE_DEFAULTS[dtype]
    out_dir = Path(options.out_dir) if options.out_dir else default_out_dir(export_dir)
    samples = make_samples(list(options.images), list(options.prompts), builtin=options.builtin_samples)
    backends = [b for b in options.backends if b != "torch"]
    trt_reason = unavailable_reason(manifest) if "trt" in backends else None
    check_backends(backends, trt_reason, options)

    integrity = [] if options.verify else check_integrity(export_dir, manifest)
    progress("loading the PyTorch reference (source/ model)")
    reference = ReferenceFromExport(export_dir, manifest)
    pipe = reference()

    graph_results: list[graphs.GraphResult] = []
    if options.graph_checks:
        for graph in options.graphs or list(manifest.graphs):
            feeds = graph_feeds(pipe, manifest, graph, samples, seed=options.seed)
            for backend in backends:
                if backend == "trt" and trt_reason:
                    graph_results.append(graphs.skipped(graph, backend, trt_reason))
                    continue
                progress(f"graph {graph}: torch vs {backend}")
                graph_table, tie_tol = table, near_tie_tol
                if backend == "trt":  # tolerances follow the engine's precision (fsr-build --precision)
                    precision = _engine_precision(manifest, graph)
                    if precision is None:
                        graph_results.append(graphs.skipped(graph, backend, f"no TensorRT engine for graph {graph!r}"))
                        continue
                    graph_table = ToleranceTable(precision, options.tolerances)
                    tie_tol = options.near_tie_tol if options.near_tie_tol is not None else NEAR_TIE_DEFAULTS[precision]
                try:
                    with _polygraphy_quiet(options.verbose):
                        graph_results.append(graphs.compare_graph(
                            export_dir, manifest, reference, graph, backend, feeds, graph_table, out_dir,
                            near_tie_tol=tie_tol))
                except Exception as exc:  # a runner that cannot build or run: reported, and a failure
                    graph_results.append(graphs.errored(graph, backend, exc))

    e2e: list[end_to_end.BackendE2E] = []
    if options.end_to_end and backends:
        progress("end to end: reference generation (PyTorch)")
        reference_results = end_to_end.reference_generate(pipe, samples, options.max_new_tokens)
        for backend in backends:
            if backend == "trt" and trt_reason:
                e2e.append(end_to_end.skipped(backend, trt_reason))
                continue
            progress(f"end to end: generation on {backend}")
            try:
                e2e.append(end_to_end.compare_backend(
                    export_dir, manifest, pipe, backend, samples, reference_results,
                    max_new_tokens=options.max_new_tokens, logit_tol=logit_tol, near_tie_tol=near_tie_tol))
            except Exception as exc:
                e2e.append(end_to_end.errored(backend, exc))

    fidelity = fidelity_skipped = None
    if options.fidelity and pipe.spec.host_pruning:
        fidelity_skipped = (f"the {manifest.family} family lays out several crops per image on the host (and "
                            "prunes crops on the host, or per crop in the vision graph); the fidelity sweep runs "
                            "one vision row per image and does not cover it yet")
    elif options.fidelity:
        progress("pruning fidelity (PyTorch)")
        fidelity = pruning_fidelity(pipe, manifest, samples, options.budgets,
                                    methods=list(options.methods) if options.methods else None,
                                    max_new_tokens=options.max_new_tokens)

    failures = _failures(graph_results, e2e, fidelity)
    skipped = sorted({f"{g.backend}: {g.reason}" for g in graph_results if g.status == SKIPPED}
                     | {f"{e.backend}: {e.reason}" for e in e2e if e.status == SKIPPED})
    method = get_method(manifest.method.name)
    return {
        "export": str(export_dir.resolve()),
        "family": manifest.family,
        "method": method.name, "budget": method.budget(method.settings_from_json(manifest.method.settings)),
        "method_settings": manifest.method.settings, "dtype": dtype,
        "relevance": manifest.relevance.source,
        "random_weights": manifest.model.random_weights,
        "preset": manifest.model.preset,
        "reference": f"PyTorch (the {manifest.family} spec's modules + the method's readable reference) on the "
                     "export's source/ model, float32",
        "backends": backends,
        "verified": options.verify,
        "tolerances": {"defaults": {k: v.to_json() for k, v in table.for_outputs(
            sorted({o.name for g in manifest.graphs.values() for o in g.outputs})).items()},
            "near_tie_tol": near_tie_tol, "logit_near_tie_tol": logit_tol},
        "samples": [s.to_json() for s in samples],
        "integrity_warnings": integrity,
        "graphs": [g.to_json() for g in graph_results],
        "commands": [g.command for g in graph_results if g.command],
        "output_dir": str(out_dir.resolve()) if graph_results else None,
        "trt_skipped_reason": trt_reason,
        "end_to_end": [e.to_json() for e in e2e],
        "fidelity": fidelity,
        "fidelity_skipped_reason": fidelity_skipped,
        "skipped": skipped,
        "failures": failures,
        "passed": not failures,
        "seconds": time.perf_counter() - start,
    }


def _engine_precision(manifest: Manifest, graph: str) -> str | None:
    try:
        return select_engine(manifest, graph)[1].precision
    except ManifestError:
        return None


def _failures(graph_results, e2e, fidelity) -> list[str]:
    out = []
    for g in graph_results:
        if g.status == FAIL:
            for name in g.failed_outputs:
                worst = max((o for o in g.outputs if o.output == name and o.status == FAIL),
                            key=lambda o: o.max_absdiff or 0.0)
                diff = "" if worst.max_absdiff is None else \
                    f": max abs diff {worst.max_absdiff:.3g} (atol {worst.atol:g}, rtol {worst.rtol:g})"
                out.append(f"graph {g.graph!r} output {name!r} ({g.backend} vs torch){diff}")
        elif g.status == ERROR:
            out.append(f"graph {g.graph!r} ({g.backend}): could not run: {g.reason}")
    for e in e2e:
        if e.status in (FAIL, ERROR):
            out.append(f"end to end ({e.backend}): {e.reason}")
    if fidelity:
        n = fidelity["num_image_tokens"]
        for row in fidelity["rows"]:
            if row["identity"] and (row["top1_agreement"] < 1.0 or row["kl_mean"] > 0.0):
                out.append(f"fidelity: {row['method']} at budget {row['budget']} >= {n} tokens should be the identity "
                           f"but agrees {row['top1_agreement']:.1%} (KL {row['kl_mean']:.3g})")
    return out


__all__ = ["BACKENDS", "CompareError", "CompareOptions", "compare_export"]
