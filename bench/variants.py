"""Backend options side by side: one export (or several), each opened once per variant, all runs interleaved.

    python -m fsr.bench.variants EXPORT_DIR [EXPORT_DIR ...] \\
        --variant default: --variant spin=on --variant fused=false --variant embed_lookup=false \\
        --batch 1 --repeat 7 --json variants.json

A variant is ``[LABEL:]KEY=VALUE,KEY=VALUE`` (backend options, as ``fsr-bench --backend-option``
takes them; an empty list is the backend's defaults). Every (export, variant) pipeline is loaded
at once and run *i* of each is done before run *i+1* of any, so machine load hits all alike;
the load average is recorded with every run. What it answers: what each of the ONNX Runtime
backend's measures (``spin``, ``fused``, ``embed_lookup``) is worth, in TTFT and its parts and in
decode ms/token, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fsr.bench.harness import DEFAULT_PROMPT, TTFT_PARTS, run_once, synthetic_images
from fsr.bench.stats import summarize
from fsr.bench.targets import BenchError, open_export

TIMINGS = ("ttft", *TTFT_PARTS, "decode_per_token")


def parse_variant(text: str) -> tuple[str, dict]:
    label, sep, body = text.partition(":")
    if not sep:
        label, body = text, text
    options = {}
    for pair in filter(None, body.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise BenchError(f"--variant takes [LABEL:]KEY=VALUE,...; got {text!r}")
        low = value.lower()
        options[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return label or "default", options


def run(exports: list[Path], variants: list[tuple[str, dict]], *, backend: str = "ort", batch: int = 1,
        warmup: int = 1, repeat: int = 5, new_tokens: int = 16, prompt: str = DEFAULT_PROMPT,
        workdir: Path = Path("/tmp/fsr-bench-variants")) -> dict:
    targets = []
    try:
        for export in exports:
            for label, options in variants:
                target = open_export(export, backend, workdir, with_parts=False, backend_options=options)
                size = target.pipeline.manifest.vision.image_size
                request = target.pipeline.prepare(synthetic_images(batch, size), [prompt] * batch)
                targets.append((str(export), label, options, target, request))
        runs: list[list[dict]] = [[] for _ in targets]
        for i in range(warmup + repeat):
            for k, (_, _, _, target, request) in enumerate(targets):
                result = run_once(target, request, new_tokens, parts=False)
                if i >= warmup:
                    runs[k].append(result)
    finally:
        for *_, target, _ in targets:
            target.close()
    rows = []
    for (export, label, options, target, _), rs in zip(targets, runs):
        rows.append({"export": export, "variant": label, "options": options, "kept_tokens": target.kept_tokens,
                     "seq_len": int(rs[0]["seq_len"]), "batch": batch,
                     "timings_ms": {n: summarize([r[n] * 1e3 for r in rs]) for n in TIMINGS},
                     "loadavg": summarize([r["loadavg"] for r in rs if r.get("loadavg") is not None])})
    return {"schema": "fsr-bench-variants/1", "backend": backend, "settings": {
        "batch": batch, "warmup": warmup, "repeat": repeat, "new_tokens": new_tokens, "prompt": prompt},
        "loadavg_end": list(os.getloadavg()), "rows": rows}


def markdown(doc: dict) -> str:
    lines = ["| export | variant | prefill len | TTFT ms [IQR] | text enc | vision | embed | prefill | decode ms/tok "
             "| TTFT vs first variant | load |", "|" + "---|" * 11]
    first: dict[str, float] = {}
    for r in doc["rows"]:
        t = r["timings_ms"]
        base = first.setdefault(r["export"], t["ttft"]["median"])
        lines.append(f"| {Path(r['export']).name} | {r['variant']} | {r['seq_len']} | {t['ttft']['median']:.1f} "
                     f"[{t['ttft']['q1']:.1f}–{t['ttft']['q3']:.1f}] | {t['instruction']['median']:.1f} | "
                     f"{t['vision']['median']:.1f} | {t['embed']['median']:.1f} | {t['prefill']['median']:.1f} | "
                     f"{t['decode_per_token']['median']:.2f} | {base / t['ttft']['median']:.2f}× | "
                     f"{r['loadavg']['median']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsr.bench.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", required=True, help="[LABEL:]KEY=VALUE,... (repeat)")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
        doc = run(args.exports, variants, backend=args.backend, batch=args.batch, warmup=args.warmup,
                  repeat=args.repeat, new_tokens=args.new_tokens)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc["command"] = "python -m fsr.bench.variants " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
