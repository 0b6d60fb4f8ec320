"""``manifest.json``: what an export holds, how it was made, and hashes to verify it."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import onnx

from fsr.errors import FsrError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PACKAGES = ("fsr-export", "torch", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "onnxscript")


class ManifestError(FsrError, ValueError):
    """An export folder is missing, incomplete or altered; the message says what to do."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    return {
        "name": v.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
    }


def graph_entry(path: Path, root: Path) -> dict:
    """Inputs, outputs, files and hashes of one exported graph."""
    model = onnx.load(path, load_external_data=False)
    files = [path] + [path.with_name(path.name + ".data")] * path.with_name(path.name + ".data").exists()
    return {
        "file": path.relative_to(root).as_posix(),
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "files": {f.relative_to(root).as_posix(): sha256(f) for f in files},
    }


def write_manifest(root: Path, manifest: dict) -> Path:
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(root: Path, *, verify: bool = False) -> dict:
    """Load an export's manifest; with ``verify`` also check every graph file's hash."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder; pass the folder that fsr-export wrote")
    if not path.is_file():
        raise ManifestError(f"{root} holds no {MANIFEST}: not an fsr-export folder (or an interrupted one); "
                            "export again with fsr-export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); export again") from exc
    if manifest.get("format_version") != FORMAT_VERSION or "graphs" not in manifest:
        raise ManifestError(f"{path} is not a manifest this version of fsr-export understands; export again")
    if verify:
        for name, entry in manifest["graphs"].items():
            for rel, digest in entry["files"].items():
                f = root / rel
                if not f.is_file():
                    raise ManifestError(f"graph {name!r}: {f} is missing; export again")
                if sha256(f) != digest:
                    raise ManifestError(f"graph {name!r}: {f} changed since export (hash mismatch); export again")
    return manifest
