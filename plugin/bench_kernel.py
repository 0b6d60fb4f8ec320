"""Time the FocusScanRefine CUDA kernels against the fixed-shape PyTorch version on the same inputs.

    python plugin/bench_kernel.py                       # LLaVA-1.5 sizes, budgets 64/128/192
    python plugin/bench_kernel.py --tokens 2304 --dim 3584 --features 1280 --budget 256 --dtype fp16

Prints the median GPU time per call (CUDA events) of the kernels (``libfsr_kernels_test.so``, built
here with CMake for this GPU unless ``--lib`` is given) and of ``fsr.pruning.FocusScanRefineFixed``
on CUDA, and whether their kept indices agree. Needs a CUDA GPU; exits with status 2 without one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_library as kl  # noqa: E402  (plugin/ is not a package)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", type=Path, help="prebuilt libfsr_kernels_test.so (default: build one)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=576, help="N")
    p.add_argument("--dim", type=int, default=4096, help="D, token width")
    p.add_argument("--features", type=int, default=1024, help="F, feature width")
    p.add_argument("--budget", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp16", help="tokens dtype")
    p.add_argument("--no-relevance", action="store_true", help="omit the relevance input")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(args) -> dict:
    rng = np.random.default_rng(args.seed)
    b, n = args.batch, args.tokens
    token_dtype = np.float16 if args.dtype == "fp16" else np.float32
    logits = rng.standard_normal((b, n)).astype(np.float32) * 2.0
    saliency = np.exp(logits - logits.max(axis=1, keepdims=True))
    saliency = (saliency / saliency.sum(axis=1, keepdims=True)).astype(np.float32)  # CLS attention-like
    return {
        "tokens": rng.standard_normal((b, n, args.dim)).astype(token_dtype),
        "features": rng.standard_normal((b, n, args.features)).astype(np.float32),
        "saliency": saliency,
        "relevance": None if args.no_relevance else rng.uniform(-0.2, 0.4, (b, n)).astype(np.float32),
    }


def time_torch_fixed(inputs: dict, attrs: dict, warmup: int, iterations: int):
    """(median ms, kept indices) of fsr.pruning.FocusScanRefineFixed on CUDA, or (None, reason)."""
    import torch

    try:
        from fsr.pruning import FocusScanRefineFixed
    except ImportError as error:
        return None, f"fsr.pruning.FocusScanRefineFixed not importable ({error})"
    try:
        module = FocusScanRefineFixed(**attrs).cuda().eval()
    except TypeError as error:
        return None, f"FocusScanRefineFixed(budget=, alpha=, beta=, rho=, kappa=) failed: {error}"
    device_inputs = [None if v is None else torch.from_numpy(v).cuda() for v in
                     (inputs["tokens"], inputs["features"], inputs["saliency"], inputs["relevance"])]
    times = []
    with torch.inference_mode():
        for it in range(warmup + iterations):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            outputs = module(*device_inputs)
            stop.record()
            torch.cuda.synchronize()
            if it >= warmup:
                times.append(start.elapsed_time(stop))
    return float(np.median(times)), outputs[1].cpu().numpy()


def main(argv=None) -> int:
    args = parse_args(argv)
    arch = kl.gpu_arch()
    if arch is None:
        print("bench_kernel.py: no CUDA GPU visible to PyTorch on this machine; nothing to time.", file=sys.stderr)
        return 2
    if args.lib is not None:
        library = kl.KernelLibrary(args.lib)
    else:
        build_dir = Path(tempfile.mkdtemp(prefix="fsr_bench_build_"))
        print(f"building libfsr_kernels_test.so for sm_{arch} in {build_dir} ...", flush=True)
        library = kl.KernelLibrary(kl.build_kernel_library(build_dir, arch))
    if library.device_count() <= 0:
        print("bench_kernel.py: the CUDA runtime of the kernel library sees no GPU.", file=sys.stderr)
        return 2

    import torch

    inputs = make_inputs(args)
    print(f"GPU: {torch.cuda.get_device_name(0)} | B={args.batch} N={args.tokens} D={args.dim} "
          f"F={args.features} tokens={args.dtype} relevance={'no' if args.no_relevance else 'yes'}")
    print(f"{'budget':>7} {'kernel ms':>10} {'torch ms':>10} {'speed-up':>9}  indices")
    for budget in args.budget:
        attrs = dict(budget=budget, alpha=args.alpha, beta=args.beta, rho=args.rho, kappa=args.kappa)
        kernel_ms = float(np.median(library.bench(**inputs, **attrs, warmup=args.warmup,
                                                  iterations=args.iterations)))
        _, kernel_kept = library.run(**inputs, **attrs)
        torch_ms, torch_kept = time_torch_fixed(inputs, attrs, args.warmup, args.iterations)
        if torch_ms is None:
            print(f"{budget:>7} {kernel_ms:>10.3f} {'-':>10} {'-':>9}  ({torch_kept})")
            continue
        same = np.array_equal(np.asarray(kernel_kept), np.asarray(torch_kept).reshape(kernel_kept.shape))
        print(f"{budget:>7} {kernel_ms:>10.3f} {torch_ms:>10.3f} {torch_ms / kernel_ms:>8.1f}x  "
              f"{'identical' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
