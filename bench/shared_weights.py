"""Memory of an export's shared weights on ONNX Runtime: shared (one ``OrtValue`` per tensor
over the memory-mapped ``shared_weights.data``, registered in every session with
``SessionOptions.add_initializer``, MatMul prepacking off in those sessions) against each
session loading its own copy (``OnnxRuntimeBackend(share_weights=False)``).

Each measurement runs in a fresh process (the pipeline loaded, one generation): resident memory
after loading, and the peak (``VmHWM``) over load + generation. The two modes alternate
(shared, copied, shared, copied, ...) so that load on a shared machine hits both alike::

    python -m fsr.bench.shared_weights EXPORT_DIR [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from fsr.files import atomic_write

MIB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(export_dir: Path, share: bool, new_tokens: int) -> dict:
    import numpy as np
    from PIL import Image

    from fsr.runtime.pipeline import Pipeline

    before = _status_kib("VmRSS")
    # any size: the processor resizes it
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    with Pipeline(export_dir, share_weights=share) as pipe:
        loaded = _status_kib("VmRSS")
        tokens = pipe.generate([image], ["Describe the image."], max_new_tokens=new_tokens)[0].token_ids
        after = _status_kib("VmRSS")
    return {"share": share, "rss_before_mib": before / 1024, "rss_loaded_mib": loaded / 1024,
            "rss_after_generate_mib": after / 1024, "peak_mib": _status_kib("VmHWM") / 1024,
            "tokens": [int(t) for t in tokens]}


def measure(export_dir: Path, rounds: int = 2, new_tokens: int = 4) -> dict:
    index = json.loads((export_dir / "shared_weights.json").read_text())
    runs = []
    for _ in range(rounds):
        for share in (True, False):
            out = subprocess.run([sys.executable, "-m", "fsr.bench.shared_weights", str(export_dir), "--child",
                                  "1" if share else "0", "--new-tokens", str(new_tokens)],
                                 check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    users = {name: sum(1 for names in index["graphs"].values() if name in names) for name in index["tensors"]}
    return {
        "export": str(export_dir), "load": os.getloadavg(),
        "shared_file_mib": sum(t["length"] for t in index["tensors"].values()) / MIB,
        "copies_avoided_mib": sum(t["length"] * (users[n] - 1) for n, t in index["tensors"].items()) / MIB,
        "runs": runs,
    }


def table(result: dict) -> str:
    lines = [f"shared_weights.data {result['shared_file_mib']:.1f} MiB; bytes a copy per graph would add "
             f"{result['copies_avoided_mib']:.1f} MiB; load {', '.join(f'{x:.1f}' for x in result['load'])}",
             "", "| weights | RSS loaded MiB | RSS after generation MiB | peak MiB |", "|---|---:|---:|---:|"]
    for run in result["runs"]:
        lines.append(f"| {'shared' if run['share'] else 'copied'} | {run['rss_loaded_mib']:.0f} | "
                     f"{run['rss_after_generate_mib']:.0f} | {run['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.export_dir, args.child == "1", args.new_tokens)))
        return 0
    if not (args.export_dir / "shared_weights.json").is_file():
        print(f"{args.export_dir} has no shared_weights.json: export with a method whose graphs share "
              "weights (e.g. --method pio-fvlm)", file=sys.stderr)
        return 2
    result = measure(args.export_dir, args.rounds, args.new_tokens)
    print(table(result))
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
