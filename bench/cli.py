"""``fsr-bench``: what pruning buys, measured against the device's roofline.

    fsr-bench [EXPORT_DIR ...] [--preset small [--methods fsr,visionzip,pio-fvlm]] [--budgets 576,192,128,64]
              [--backend ort|trt|torch]
              [--batch 1,4] [--warmup N] [--repeat N] [--new-tokens N] [--json FILE] [--plot FILE.png]
    fsr-bench op [--n N --d D --f F --budget 64] [--export DIR] [--bench-json FILE]

Two typer apps built like every fsr command (`fsr.cli`); ``main`` sends ``op`` to the second.
The work lives in importable modules (`targets`, `harness`, `report`, `op`), imported once
the arguments are checked; this file only parses arguments, shows progress and writes the
outputs. Files are written only where ``--json``, ``--plot`` and ``--markdown`` say; those
places are checked before the run (a bad path does not lose minutes of measurements) and
written atomically. Preset exports are cached under ``--cache-dir`` in a folder keyed by
the tool's version and code (`fsr.bench.targets.export_cache_key`); folders of other
versions are never reused (the run says so, and where they are).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from fsr.cli import OptionError, check_output_file, command, current_argv, err, make_app, print_note, run_app, \
    split_list
from fsr.files import atomic_write, check_output_place
from fsr.models import FAMILIES, get_family
from fsr.pruning.methods import method_names
from fsr.runtime.backend import BackendError
from fsr.settings import DTYPES

DEFAULT_CACHE = Path("~/.cache/fsr-bench")
#: budgets of a --preset run without --budgets (the unpruned baseline is always measured too)
DEFAULT_PRESET_BUDGETS = (192, 128, 64)
BACKENDS = ("ort", "trt", "torch")

app = make_app("Time to first token, its parts, decode speed, KV cache and memory per pruning budget, with "
               "speedups against the unpruned export and the roofline ideal. `fsr-bench op --help`: the pruning "
               "op alone.")
op_app = make_app("The FocusScanRefine op alone: PyTorch reference and fixed-shape module, ONNX Runtime (function "
                  "body), and the CUDA plugin kernel when a GPU is present. With --bench-json, each time is also "
                  "given as a share of that benchmark's time to first token.")


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> a dict (true/false -> bool, integers -> int)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionError(f"--backend-option takes KEY=VALUE, got {pair!r}")
        low = value.lower()
        out[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return out


def _positive(values: list[int], option: str) -> list[int]:
    if not values or any(v < 1 for v in values):
        raise OptionError(f"{option} takes integers >= 1 separated by commas (got {values})")
    return values


def _devices(backend: str, device: str | None) -> tuple[str, str]:
    """(device whose roofline applies, how memory is tracked)."""
    import torch  # noqa: PLC0415 (heavy: after the arguments are checked)

    if backend == "torch":
        d = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return d, d
    if backend == "trt":
        if not torch.cuda.is_available():
            raise BackendError("the trt backend runs TensorRT engines on an NVIDIA GPU and torch sees none here; "
                               "use --backend ort (or torch) on this machine")
        return "cuda", "cuda-device"
    import onnxruntime as ort  # noqa: PLC0415

    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    return ("cuda" if gpu else "cpu"), "cpu"


@app.command()
@command
def bench(
    exports: Optional[List[Path]] = typer.Argument(
        None, metavar="[EXPORT_DIR]...", help="fsr-export folders of one model (include the unpruned one: "
                                               "--method none)."),
    preset: Optional[str] = typer.Option(None, help="Build and export a random-weight preset instead (e.g. small)."),
    family: str = typer.Option("llava", help=f"Model family of --preset: {' | '.join(FAMILIES)}."),
    budgets: Optional[str] = typer.Option(None, help="Image tokens kept, comma-separated; >= the image's tokens "
                                                     "means unpruned (the unpruned baseline is always measured; "
                                                     "default with --preset: 192,128,64; with folders: every "
                                                     "budget they hold)."),
    methods: Optional[str] = typer.Option(None, help="With --preset: pruning methods exported at every budget, "
                                                     "comma-separated (default fsr; e.g. fsr,visionzip,pio-fvlm: "
                                                     "each at equal (for pio-fvlm: average) budget). Export folders "
                                                     "bring their own."),
    backend: str = typer.Option("ort", help=" | ".join(BACKENDS) + "."),
    batch: str = typer.Option("1", help="Batch sizes, comma-separated."),
    warmup: int = typer.Option(1, min=0, help="Warm-up runs per budget and batch."),
    repeat: int = typer.Option(5, min=1, help="Measured runs per budget and batch."),
    new_tokens: int = typer.Option(16, "--new-tokens", min=1, help="Tokens generated per run."),
    prompt: Optional[str] = typer.Option(None, help="Prompt of every row."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full results here (nothing is written "
                                                                  "without it)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot here."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the tables here."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir", help="Where --preset exports (and cut vision "
                                                                      "graphs) are kept, in a folder per version "
                                                                      "of this tool."),
    force_export: bool = typer.Option(False, "--force-export", help="Re-export presets even when cached."),
    dtype: Optional[str] = typer.Option(None, help="Preset dtype: fp32 | fp16 (default fp32; fp16 for the torch "
                                                   "backend on CUDA)."),
    device: Optional[str] = typer.Option(None, help="torch backend device: cpu | cuda (default cuda when "
                                                    "available)."),
    fsr_impl: str = typer.Option("fixed", "--fsr-impl", help="torch backend: the pruning op's form, fixed (the "
                                                             "fixed-shape module) | reference."),
    sequential: bool = typer.Option(False, "--sequential", help="Time one budget after the other with only it "
                                                                "loaded (default: all loaded, runs interleaved so "
                                                                "load changes hit every budget alike; memory is "
                                                                "always measured alone)."),
    backend_option: Optional[List[str]] = typer.Option(
        None, "--backend-option", metavar="KEY=VALUE", help="Passed to the backend (repeatable), e.g. threads=2 "
                                                            "(ort), precision=fp16, plugin=true, cuda_graphs=true "
                                                            "(trt)."),
    seed: int = typer.Option(0, help="Seed of a preset's random weights."),
    transformers: bool = typer.Option(True, "--transformers/--no-transformers",
                                      help="Also time plain transformers generate (unpruned, sdpa) on the same weights, "
                                           "interleaved with the budgets, and print every row against it."),
    peak_matmul: Optional[int] = typer.Option(None, "--peak-matmul", help="Matrix size of the peak FLOP/s "
                                                                          "measurement."),
    peak_copy_mib: Optional[int] = typer.Option(None, "--peak-copy-mib", help="MiB copied to measure peak "
                                                                              "bandwidth."),
) -> int:
    """Time to first token and its parts, decode, KV cache and memory per budget, against the roofline."""
    started = time.perf_counter()
    argv = current_argv()
    if bool(exports) == bool(preset):
        raise OptionError("pass export folders or --preset NAME (one of the two)")
    if backend not in BACKENDS:
        raise OptionError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dtype not in (None, *DTYPES):
        raise OptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device not in (None, "cpu", "cuda"):
        raise OptionError(f"unknown --device {device!r}; choose cpu or cuda")
    if fsr_impl not in ("fixed", "reference"):
        raise OptionError(f"unknown --fsr-impl {fsr_impl!r}; choose fixed or reference")
    get_family(family)
    if methods and not preset:
        raise OptionError("--methods applies to --preset; export folders bring their own method")
    method_list = tuple(split_list(methods, "--methods")) if methods else None
    usable = method_names(exportable=True, prunes=True)
    if method_list and any(m not in usable for m in method_list):
        raise OptionError(f"--methods takes pruning methods with an in-graph form ({', '.join(usable)}); got "
                          f"{', '.join(method_list)} (the unpruned baseline is always measured)")
    budget_list = _positive(split_list(budgets, "--budgets", int), "--budgets") if budgets else None
    batches = _positive(split_list(batch, "--batch", int), "--batch")
    backend_options = _options(backend_option or [])
    for path, option in ((json_path, "--json"), (plot, "--plot"), (markdown, "--markdown")):
        if path is not None:
            check_output_file(path, option)  # before the run: a bad path must not lose minutes of measurements
    check_output_place(cache_dir.expanduser(), option="--cache-dir")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from fsr.bench import harness, report, targets  # noqa: PLC0415 (heavy: after the arguments are checked)
    from fsr.bench.roofline import measure_peak  # noqa: PLC0415

    settings = harness.BenchSettings(batches=batches, warmup=warmup, repeat=repeat, new_tokens=new_tokens,
                                     prompt=prompt or harness.DEFAULT_PROMPT)
    settings.validate()
    cache = cache_dir.expanduser()
    key = targets.export_cache_key()
    workdir = targets.cache_root(cache, key) / "split"
    others = targets.other_cache_keys(cache, key)
    if others:
        print_note(f"{cache} holds {len(others)} folder(s) from other versions of fsr-export "
                   f"({', '.join(p.name for p in others)}); they are not used (this version's is {key}): "
                   "delete them to free the space")
    peak_device, memory_device = _devices(backend, device)
    if backend == "torch" and device is None:
        device = peak_device
    export_start = time.perf_counter()
    with err.status("preparing targets") as status:
        def progress(step: str) -> None:
            err.log(step)
            status.update(step)

        if preset:
            specs, info, _ = targets.targets_from_preset(
                preset, budget_list or list(DEFAULT_PRESET_BUDGETS), backend, workdir, cache_dir=cache, family=family,
                dtype=dtype, device=device, seed=seed, force=force_export, method_form=fsr_impl,
                progress=progress, backend_options=backend_options, methods=method_list or (targets.PRESET_METHOD,))
        else:
            specs, info = targets.targets_from_exports(list(exports), backend, budget_list, workdir, device=device,
                                                       method_form=fsr_impl, backend_options=backend_options)
        export_s = time.perf_counter() - export_start
        progress(f"measuring the {peak_device}'s peak FLOP/s and bandwidth")
        peak_dtype = info.dtype if peak_device == "cuda" else "fp32"

        def remeasure():
            return measure_peak(peak_device, peak_dtype, matmul_n=peak_matmul, copy_mib=peak_copy_mib)

        peak = remeasure()
        reference = None
        if transformers:
            progress("loading the same weights in transformers (generate, sdpa)")
            reference = targets.transformers_reference(specs, device if backend == "torch" else None)
    err.log(f"peak: {peak.peak_flops / 1e9:.1f} GFLOP/s, {peak.peak_bandwidth / 1e9:.1f} GB/s ({peak.name})")

    per_config = settings.warmup + settings.repeat + 1  # + the memory run
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err) as bar:
        overall = bar.add_task("all runs", total=len(specs) * len(settings.batches) * per_config)

        def label(spec) -> str:
            if spec.is_baseline:
                return "unpruned"
            return f"{spec.method} budget {spec.budget}" if len(method_list) > 1 else f"budget {spec.kept_tokens}"

        def label(spec) -> str:  # a method that prunes inside the LLM: its budget is the schedule's average
            return "unpruned" if spec.is_baseline else f"{spec.method} budget {spec.budget or spec.kept_tokens}"

        def on_target(spec, phase: str) -> None:
            name = label(spec)
            err.log(f"opening {name} on {backend} ({phase})")

        def on_config(spec, batch_size):
            name = label(spec)
            task = bar.add_task(f"{name} · batch {batch_size}", total=per_config)

            def tick() -> None:
                bar.advance(task)
                bar.advance(overall)
            return tick

        doc = harness.run_benchmark(specs, info, peak, settings, backend=backend, device=memory_device,
                                    interleave=not sequential, on_target=on_target, on_config=on_config,
                                    remeasure_peak=remeasure, reference=reference)
    doc["command"] = "fsr-bench " + " ".join(shlex.quote(a) for a in argv)
    doc["preset"] = preset
    doc["export_s"] = export_s
    doc["wall_s"] = time.perf_counter() - started
    text = report.markdown(doc)
    print(text)
    if markdown:
        atomic_write(markdown, text)
        err.log(f"wrote {markdown}")
    if json_path:
        atomic_write(json_path, json.dumps(doc, indent=2) + "\n")
        err.log(f"wrote {json_path}")
    if plot:
        report.plot(doc, plot)
        err.log(f"wrote {plot}")
    err.log(f"done in {doc['wall_s']:.0f} s (exports {export_s:.0f} s)")
    return 0


@op_app.command()
@command
def op(
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Tokens N (default: the op benchmark's, or the "
                                                             "benchmark's model)."),
    d: Optional[int] = typer.Option(None, "--d", min=1, help="Token width D (default: as --n)."),
    f: Optional[int] = typer.Option(None, "--f", min=1, help="Feature width F (default: as --n)."),
    budget: int = typer.Option(64, min=1),
    batch: int = typer.Option(1, min=1),
    warmup: int = typer.Option(2, min=0),
    repeat: int = typer.Option(10, min=1),
    export: Optional[Path] = typer.Option(None, help="FSR export whose op (function body, sizes, budget) to time "
                                                     "in ONNX Runtime."),
    bench_json: Optional[Path] = typer.Option(None, "--bench-json", help="A `fsr-bench --json` file: sizes and "
                                                                         "TTFT from it."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip the (slow, per-row) PyTorch reference."),
    kernel_lib: Optional[str] = typer.Option(None, "--kernel-lib", help="Path of libfsr_kernels_test.so "
                                                                        "(plugin/)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
) -> int:
    """Time the FocusScanRefine op alone."""
    if bench_json is not None and not bench_json.is_file():
        raise OptionError(f"--bench-json {bench_json} is not a file")
    if json_path is not None:
        check_output_file(json_path, "--json")
    try:
        bench_doc = json.loads(bench_json.read_text()) if bench_json else None
    except json.JSONDecodeError as exc:
        raise OptionError(f"--bench-json {bench_json} is not JSON ({exc})") from None
    from fsr.bench.op import bench_op, markdown, op_defaults_from_bench  # noqa: PLC0415 (heavy: after the checks)

    sizes: dict[str, int] = {}
    export_dir = export
    if bench_doc is not None:
        from_bench = op_defaults_from_bench(bench_doc, budget, batch)
        sizes.update({k: from_bench[k] for k in ("n", "d", "f")})
        export_dir = export_dir or from_bench.get("export_dir")
        if export_dir is not None and not Path(export_dir).is_dir():
            export_dir = None
    sizes.update({k: v for k, v in (("n", n), ("d", d), ("f", f)) if v is not None})
    with err.status("timing FocusScanRefine"):
        doc = bench_op(batch=batch, budget=budget, warmup=warmup, repeat=repeat, export_dir=export_dir,
                       bench_json=bench_doc, kernel_lib=kernel_lib, reference=not no_reference, **sizes)
    print(markdown(doc))
    if json_path:
        atomic_write(json_path, json.dumps(doc, indent=2) + "\n")
        err.log(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fsr-bench [...]`` or ``fsr-bench op [...]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "op":
        return run_app(op_app, argv[1:], prog_name="fsr-bench op")
    return run_app(app, argv, prog_name="fsr-bench")


if __name__ == "__main__":
    sys.exit(main())
