"""The model families ``fsr-export`` knows, found by name or by a checkpoint's ``model_type``.

A family is one module of ``fsr.models`` defining a `fsr.models.spec.ModelSpec` subclass
decorated with `register_family`. The catalogue below is what the command-line tools need
before any heavy import (the family modules import torch and transformers): the names that
become ``fsr-export <family>`` subcommands, their one-line summaries, preset names, and the
``config.json`` ``model_type`` values a family accepts, so that a checkpoint of another
kind is refused before any weights are built::

    spec = get_spec("llava")                # imports fsr.models.llava
    family_of(Path("ckpt"))                 # "llava" (from config.json), or ModelError
    check_checkpoint(Path("ckpt"), "llava") # ModelError naming what the folder holds instead
                                            # (or the processor files it lacks)
    resolve_clip_path("openai/clip-...")    # a --clip checkpoint: found, and a CLIP model

Adding a family: its module, plus one `FamilyEntry` line here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

from fsr.errors import FsrError


class ModelError(FsrError, ValueError):
    """A model could not be found or does not fit; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    name: str  # the fsr-export subcommand and the manifest's ``family``
    module: str  # the module that registers the family's spec
    model_types: tuple[str, ...]  # config.json model_type values of its checkpoints
    summary: str
    presets: tuple[str, ...]  # random-weight presets (the module defines them; a test checks both agree)
    default_preset: str = "tiny"
    multi_crop: bool = False  # several crops per image (a method's ``multi_crop`` then says where its op runs)


CATALOG: tuple[FamilyEntry, ...] = (
    FamilyEntry("llava", "fsr.models.llava", ("llava",),
                "LLaVA-1.5: CLIP ViT tower with [CLS], MLP projector, Llama LLM (LlavaForConditionalGeneration)",
                ("tiny", "tiny-deep", "small", "small-deep", "llava-1.5-7b")),
    FamilyEntry("llava-next", "fsr.models.llava_next", ("llava_next",),
                "LLaVA-NeXT: anyres crops (base + up to 2x2 / 1x3 / 3x1 tiles of 336 px), CLIP ViT tower with [CLS], "
                "unpadding and image newlines, Llama LLM (LlavaNextForConditionalGeneration)",
                ("tiny", "small", "llava-v1.6-7b"), multi_crop=True),
)
FAMILIES: dict[str, FamilyEntry] = {e.name: e for e in CATALOG}

_SPECS: dict[str, object] = {}


def register_family(name: str):
    """Class decorator for a family's `ModelSpec` subclass: one instance, found by ``name``."""

    def decorate(cls):
        if name not in FAMILIES:
            raise TypeError(f"family {name!r} has no catalogue entry in fsr.models.registry")
        cls.name = name
        cls.entry = FAMILIES[name]
        _SPECS[name] = cls()
        return cls

    return decorate


def family_names() -> list[str]:
    return list(FAMILIES)


def get_family(name: str) -> FamilyEntry:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def get_spec(name: str):
    """The family's `ModelSpec` (its module is imported here, on first use: it needs torch)."""
    entry = get_family(name)
    if name not in _SPECS:
        importlib.import_module(entry.module)
    return _SPECS[name]


# ----------------------------------------------------------------------------- checkpoints


def resolve_model_path(model: str) -> Path:
    """A local checkpoint folder, or a hub id resolved from the local Hugging Face cache only."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but holds no config.json: not a Hugging Face checkpoint")
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; --model takes a checkpoint folder or a hub id")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        # huggingface_hub is only needed for hub ids (a deliberate late import: it is slow to load)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model, local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise ModelError(
                f"model {model!r} is not a local folder and is not in the Hugging Face cache ({cache}); "
                "no network is used: download it where a network exists and pass its folder with --model"
            ) from exc
    presets = sorted({p for e in CATALOG for p in e.presets})
    raise ModelError(
        f"unknown model {model!r}: not a local folder, not a hub id (owner/name), "
        f"and not a preset ({', '.join(presets)})"
    )


def read_config(path: Path) -> dict:
    """``config.json`` of a checkpoint folder, as a dict (ModelError when unreadable)."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file} cannot be read as JSON ({exc}); the checkpoint is damaged") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{file} is not a JSON object; the checkpoint is damaged")
    return config


def family_of(path: Path) -> str:
    """The family whose checkpoints have this folder's ``model_type``."""
    model_type = read_config(path).get("model_type")
    for entry in CATALOG:
        if model_type in entry.model_types:
            return entry.name
    known = ", ".join(f"{t} ({e.name})" for e in CATALOG for t in e.model_types)
    raise ModelError(f"{path} holds a {model_type!r} checkpoint (model_type in config.json); fsr-export exports "
                     f"{known}")


#: files a tokenizer is loaded from (one is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_processor_files(path: Path, *, image: bool = True, what: str = "the checkpoint") -> None:
    """Refuse (ModelError) a checkpoint folder without the files its processor is loaded from:
    a tokenizer, and (``image``) an image-processor configuration (``preprocessor_config.json``,
    or a ``processor_config.json`` holding an ``image_processor``). Checked before any weights
    are read: without them the export would fail after loading the model."""
    path = Path(path)
    fix = ("copy the processor files from the model it came from (in Python: "
           "AutoProcessor.from_pretrained(ORIGINAL).save_pretrained(FOLDER))")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): {what} is incomplete; {fix}")
    if not image:
        return
    has_image = (path / "preprocessor_config.json").is_file()
    if not has_image and (path / "processor_config.json").is_file():
        try:
            has_image = "image_processor" in json.loads((path / "processor_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            raise ModelError(f"{path}/processor_config.json cannot be read as JSON: {what} is damaged; {fix}") \
                from None
    if not has_image:
        raise ModelError(f"{path} has no image-processor configuration (preprocessor_config.json, or "
                         f"processor_config.json with an image_processor): {what} is incomplete; {fix}")


def resolve_clip_path(clip: str) -> Path:
    """The ``--clip`` checkpoint (a local folder or a cached hub id), refused unless it is a
    CLIP model with a tokenizer; before any weights are built."""
    path = Path(clip).expanduser()
    if not path.exists() and not (clip.count("/") == 1 and not clip.startswith((".", "/", "~"))):
        raise ModelError(f"--clip {clip}: no such folder; pass the folder of a CLIP checkpoint (text tower + "
                         "projections, model_type 'clip') or a hub id in the local Hugging Face cache")
    try:
        path = resolve_model_path(clip)
    except ModelError as exc:
        raise ModelError(f"--clip {clip}: {exc}") from None
    model_type = read_config(path).get("model_type")
    if model_type != "clip":
        raise ModelError(f"--clip {clip} holds a {model_type!r} checkpoint, not a CLIP model (text tower + "
                         "projections): pass the CLIP checkpoint the vision tower came from")
    check_processor_files(path, image=False, what="the CLIP checkpoint")
    return path


def check_checkpoint(path: Path, family: str) -> dict:
    """Refuse a checkpoint of another kind, or one without its processor files, before any
    weights are built; returns its config."""
    entry = get_family(family)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type in entry.model_types:
        check_processor_files(path)
        return config
    other = next((e.name for e in CATALOG if model_type in e.model_types), None)
    fix = (f"export it with `fsr-export {other}`" if other else
           f"fsr-export {family} takes {', '.join(entry.model_types)} checkpoints "
           f"({entry.summary.split(':')[0]})")
    raise ModelError(f"{path} holds a {model_type!r} checkpoint (model_type in config.json), not a {family} one: "
                     f"{fix}")
