"""``fsr-bench``: what pruning buys, measured against the device's roofline.

    fsr-bench [EXPORT_DIR ...] [--preset small] [--budgets 576,192,128,64] [--backend ort|trt|torch]
              [--batch 1,4] [--warmup N] [--repeat N] [--new-tokens N] [--json FILE] [--plot FILE.png]
    fsr-bench op [--n 576 --d 4096 --f 1024 --budget 64] [--export DIR] [--bench-json FILE]

The work lives in importable modules (`targets`, `harness`, `report`, `op`); this file
only parses arguments, shows progress and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
DEFAULT_CACHE = Path("~/.cache/fsr-bench")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsr-bench",
        description="Time to first token, its parts, decode speed, KV cache and memory per pruning budget, with "
                    "speedups against the unpruned export and the roofline ideal. `fsr-bench op --help`: the "
                    "FocusScanRefine op alone.")
    p.add_argument("exports", nargs="*", type=Path, metavar="EXPORT_DIR",
                   help="fsr-export folders of one model (include the unpruned one: --method none)")
    p.add_argument("--preset", help="build and export a random-weight preset instead (small, llava-1.5-7b, tiny)")
    p.add_argument("--budgets", type=_ints, default=None,
                   help="image tokens kept, comma-separated; >= 576 means unpruned (default with --preset: "
                        "576,192,128,64; with folders: every budget they hold)")
    p.add_argument("--backend", default="ort", choices=["ort", "trt", "torch"])
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per budget and batch (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="measured runs per budget and batch (default 5)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default 16)")
    p.add_argument("--prompt", default=None, help="prompt of every row")
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"where --preset exports (and cut vision graphs) are kept (default {DEFAULT_CACHE})")
    p.add_argument("--force-export", action="store_true", help="re-export presets even when cached")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default=None,
                   help="preset dtype (default fp32; fp16 for the torch backend on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="torch backend device (default cuda when available)")
    p.add_argument("--fsr-impl", choices=["fixed", "reference"], default="fixed",
                   help="torch backend: FocusScanRefine implementation (default: the fixed-shape module)")
    p.add_argument("--sequential", action="store_true",
                   help="time one budget after the other with only it loaded (default: all loaded, runs "
                        "interleaved so load changes hit every budget alike; memory is always measured alone)")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the backend (repeatable), e.g. threads=2 (ort), precision=fp16, plugin=true, "
                        "cuda_graphs=true (trt)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--peak-matmul", type=int, default=None, help="matrix size of the peak FLOP/s measurement")
    p.add_argument("--peak-copy-mib", type=int, default=None, help="MiB copied to measure peak bandwidth")
    return p


def op_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsr-bench op",
        description="The FocusScanRefine op alone: PyTorch reference and fixed-shape module, ONNX Runtime (function "
                    "body), and the CUDA plugin kernel when a GPU is present. With --bench-json, each time is also "
                    "given as a share of that benchmark's time to first token.")
    p.add_argument("--n", type=int, default=None, help="tokens N (default 576, or the benchmark's model)")
    p.add_argument("--d", type=int, default=None, help="token width D (default 4096, or the benchmark's model)")
    p.add_argument("--f", type=int, default=None, help="feature width F (default 1024, or the benchmark's model)")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--export", type=Path, default=None,
                   help="FSR export whose op (function body, sizes, budget) to time in ONNX Runtime")
    p.add_argument("--bench-json", type=Path, default=None, help="a `fsr-bench --json` file: sizes and TTFT from it")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow, per-row) PyTorch reference")
    p.add_argument("--kernel-lib", default=None, help="path of libfsr_kernels_test.so (plugin/)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> a dict (true/false -> bool, integers -> int)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option takes KEY=VALUE, got {pair!r}")
        low = value.lower()
        out[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return out


def _devices(backend: str, device: str | None) -> tuple[str, str]:
    """(device whose roofline applies, how memory is tracked)."""
    if backend == "torch":
        import torch

        d = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return d, d
    import torch

    if backend == "trt":
        if not torch.cuda.is_available():
            from fsr.runtime.backend import BackendError

            raise BackendError("the trt backend runs TensorRT engines on an NVIDIA GPU and torch sees none here; "
                               "use --backend ort (or torch) on this machine")
        return "cuda", "cuda-device"
    import onnxruntime as ort

    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    return ("cuda" if gpu else "cpu"), "cpu"


def bench(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fsr.bench import harness, report, targets
    from fsr.bench.roofline import measure_peak
    from fsr.export.manifest import ManifestError
    from fsr.models.llava import ModelError
    from fsr.runtime.backend import BackendError

    started = time.perf_counter()
    if bool(args.exports) == bool(args.preset):
        console.print("[red]error:[/] pass export folders or --preset NAME (one of the two)")
        return 2
    settings = harness.BenchSettings(batches=args.batch, warmup=args.warmup, repeat=args.repeat,
                                     new_tokens=args.new_tokens, prompt=args.prompt or harness.DEFAULT_PROMPT)
    try:
        settings.validate()
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    try:
        backend_options = _options(args.backend_option)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    cache = args.cache_dir.expanduser()
    workdir = cache / "split"
    try:
        peak_device, memory_device = _devices(args.backend, args.device)
        if args.backend == "torch" and args.device is None:
            args.device = peak_device
        export_start = time.perf_counter()
        with console.status("preparing targets") as status:
            def progress(step: str) -> None:
                console.log(step)
                status.update(step)

            if args.preset:
                specs, info, _ = targets.targets_from_preset(
                    args.preset, args.budgets or [576, 192, 128, 64], args.backend, workdir, cache_dir=cache,
                    dtype=args.dtype, device=args.device, seed=args.seed, force=args.force_export,
                    fsr_implementation=args.fsr_impl, progress=progress, backend_options=backend_options)
            else:
                specs, info = targets.targets_from_exports(args.exports, args.backend, args.budgets, workdir,
                                                           device=args.device, fsr_implementation=args.fsr_impl,
                                                           backend_options=backend_options)
            export_s = time.perf_counter() - export_start
            progress(f"measuring the {peak_device}'s peak FLOP/s and bandwidth")
            peak_dtype = info.dtype if peak_device == "cuda" else "fp32"
            def remeasure():
                return measure_peak(peak_device, peak_dtype, matmul_n=args.peak_matmul, copy_mib=args.peak_copy_mib)

            peak = remeasure()
        console.log(f"peak: {peak.peak_flops / 1e9:.1f} GFLOP/s, {peak.peak_bandwidth / 1e9:.1f} GB/s ({peak.name})")

        per_config = settings.warmup + settings.repeat + 1  # + the memory run
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console) as bar:
            overall = bar.add_task("all runs", total=len(specs) * len(settings.batches) * per_config)

            def on_target(spec, phase: str) -> None:
                name = "unpruned" if spec.is_baseline else f"budget {spec.kept_tokens}"
                console.log(f"opening {name} on {args.backend} ({phase})")

            def on_config(spec, batch):
                name = "unpruned" if spec.is_baseline else f"budget {spec.kept_tokens}"
                task = bar.add_task(f"{name} · batch {batch}", total=per_config)

                def tick() -> None:
                    bar.advance(task)
                    bar.advance(overall)
                return tick

            doc = harness.run_benchmark(specs, info, peak, settings, backend=args.backend, device=memory_device,
                                        interleave=not args.sequential, on_target=on_target, on_config=on_config,
                                        remeasure_peak=remeasure)
    except (targets.BenchError, ManifestError, ModelError, BackendError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    doc["command"] = "fsr-bench " + " ".join(shlex.quote(a) for a in args._argv)
    doc["preset"] = args.preset
    doc["export_s"] = export_s
    doc["wall_s"] = time.perf_counter() - started
    text = report.markdown(doc)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        console.log(f"wrote {args.json}")
    if args.plot:
        report.plot(doc, args.plot)
        console.log(f"wrote {args.plot}")
    console.log(f"done in {doc['wall_s']:.0f} s (exports {export_s:.0f} s)")
    return 0


def op(args) -> int:
    from fsr.bench.op import bench_op, markdown, op_defaults_from_bench

    bench_doc = json.loads(args.bench_json.read_text()) if args.bench_json else None
    sizes = {"n": 576, "d": 4096, "f": 1024}
    export_dir = args.export
    if bench_doc is not None:
        from_bench = op_defaults_from_bench(bench_doc, args.budget, args.batch)
        sizes.update({k: from_bench[k] for k in ("n", "d", "f")})
        export_dir = export_dir or from_bench.get("export_dir")
        if export_dir is not None and not Path(export_dir).is_dir():
            export_dir = None
    for k in sizes:
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    with console.status("timing FocusScanRefine"):
        doc = bench_op(batch=args.batch, budget=args.budget, warmup=args.warmup, repeat=args.repeat,
                       export_dir=export_dir, bench_json=bench_doc, kernel_lib=args.kernel_lib,
                       reference=not args.no_reference, **sizes)
    print(markdown(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        console.log(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "op":
        return op(op_parser().parse_args(argv[1:]))
    args = run_parser().parse_args(argv)
    args._argv = argv
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
