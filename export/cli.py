"""``fsr-export <family>``: trace a VLM to ONNX with its pruning method inside the graphs.

One subcommand per model family of the registry (`fsr.models.registry`), each with the
same options: the common ones below, plus every option of every exportable pruning method
(`fsr.pruning.methods`; ``--budget``, ``--alpha``, ... come from the methods' settings
classes). A method option is ``None`` unless given, so a method's own defaults apply, and
an option the chosen method does not take is refused. Arguments are checked (settings,
output folder, the checkpoint's ``model_type`` and processor files, ``--clip``) before
torch is imported; settings that prune nothing (``--budget`` >= the image's tokens) are
named once the model is loaded, before the export starts.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

import fsr.export
from fsr.cli import command, err, exit_program, make_app, print_note, run_app
from fsr.files import check_output_folder
from fsr.models import FAMILIES, check_checkpoint, get_spec, load_model, resolve_model_path
from fsr.models.registry import FamilyEntry, ModelError, resolve_clip_path
from fsr.pruning.methods import PER_CROP, MethodError, get_method, method_names, methods
from fsr.settings import DTYPES, FORMATS, SettingField

app = make_app("Export vision-language models to ONNX with visual-token pruning inside the graphs.", subcommands=True)


@app.callback()
def _root() -> None:
    """Export vision-language models to ONNX with visual-token pruning inside the graphs."""


def method_options() -> dict[str, tuple[SettingField, list[str]]]:
    """Every command-line setting of the exportable methods: name -> (field, methods taking it)."""
    out: dict[str, tuple[SettingField, list[str]]] = {}
    for method in methods():
        if not method.exportable:
            continue
        for field in method.Settings.fields():
            if not field.info.cli:
                continue
            if field.name in out:
                known, users = out[field.name]
                if known.base_type != field.base_type:  # int and int | None: one option
                    raise TypeError(f"option --{field.name} has two types ({known.type}, {field.type})")
                users.append(method.name)
            else:
                out[field.name] = (field, [method.name])
    return out


def _budget_note(entry: FamilyEntry, users: list[str]) -> str:
    """What ``--budget`` counts in a multi-crop family: per crop for a ``per_crop`` method, per image otherwise."""
    per_crop = [n for n in users if get_method(n).multi_crop == PER_CROP]
    if not entry.multi_crop or not per_crop:
        return ""
    others = [n for n in users if n not in per_crop]
    return (f" {entry.name}: per crop for {', '.join(per_crop)} (every crop of an image: n crops get n x budget "
            "tokens)" + (f", per image for {', '.join(others)}" if others else "") + ".")


def _option_parameter(field: SettingField, users: list[str], entry: FamilyEntry) -> inspect.Parameter:
    choices = f" ({' | '.join(map(str, field.info.choices))})" if field.info.choices else ""
    note = _budget_note(entry, users) if field.name == "budget" else ""
    text = f"{field.info.help}{choices}{note} (method {', '.join(users)}; default {field.default})"
    base = field.base_type
    annotation = Optional[base] if base in (int, float, str, bool) else Optional[str]
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(None, field.flag, help=text, show_default=False))


def _common_parameters(entry: FamilyEntry) -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    presets = ", ".join(entry.presets)
    return [
        inspect.Parameter("method", kw, annotation=str, default=typer.Option(
            "fsr", help=f"Pruning method: {' | '.join(method_names(exportable=True))}.")),
        inspect.Parameter("model", kw, annotation=Optional[str], default=typer.Option(
            None, help=f"Checkpoint folder, hub id from the local HF cache, or a preset ({presets}). "
                       f"Default: the built-in '{entry.default_preset}' preset.")),
        inspect.Parameter("clip", kw, annotation=Optional[str], default=typer.Option(
            None, help="CLIP checkpoint (text tower) for instruction relevance, with a --model checkpoint "
                       "(default: its clip/ folder, if any).")),
        inspect.Parameter("output", kw, annotation=Optional[Path], default=typer.Option(
            None, "--output", "-o", help=f"Export folder (default exports/{entry.name}-<model>-<method>).")),
        inspect.Parameter("dtype", kw, annotation=str, default=typer.Option("fp32", help=" | ".join(DTYPES) + ".")),
        inspect.Parameter("format", kw, annotation=str, default=typer.Option(
            "native", "--format", help=f"{' | '.join(FORMATS)}: our layout, or one Transformers.js runs as it is "
                                       "(onnx/*.onnx + its config files; our commands read both).")),
        inspect.Parameter("seed", kw, annotation=int, default=typer.Option(0, help="Seed of a preset's random weights.")),
        inspect.Parameter("force", kw, annotation=bool, default=typer.Option(
            False, "--force", help="Replace an existing output folder.")),
    ]


def _make_family_command(entry: FamilyEntry):
    options = method_options()

    def export(**values: Any) -> None:
        export_family(entry, values, list(options))

    params = _common_parameters(entry) + [_option_parameter(f, users, entry) for f, users in options.values()]
    export.__signature__ = inspect.Signature(params, return_annotation=None)
    export.__annotations__ = {p.name: p.annotation for p in params}
    export.__doc__ = f"Export {entry.summary.split(':')[0]}: vision (+ pruning op), token embedding, decoder " \
                     "(prefill + decode), text encoder."
    return command(export)


def default_output(entry: FamilyEntry, model: str | None, method: str, budget: int | None) -> Path:
    """``exports/<family>-<model>-<method>[-b<budget>]``, where fsr-export writes without ``-o``."""
    tag = method if budget is None else f"{method}-b{budget}"
    return Path("exports") / f"{entry.name}-{Path(model or entry.default_preset).name}-{tag}"


def export_family(entry: FamilyEntry, values: dict[str, Any], option_names: list[str]) -> None:
    """The body of ``fsr-export <family>``: check everything light, then load, then export."""
    method = get_method(values["method"])
    if not method.exportable:
        raise MethodError(f"method {method.name!r} has no in-graph form; exportable methods: "
                          f"{', '.join(method_names(exportable=True))}")
    given = {k: values[k] for k in option_names if values.get(k) is not None}
    own = {f.name for f in method.Settings.fields()}
    foreign = sorted(k for k in given if k not in own)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        takes = ", ".join("--" + f.replace("_", "-") for f in sorted(own))
        raise MethodError(f"{flags} do(es) not apply to method {method.name!r}, which takes "
                          f"{'the options ' + takes if takes else 'no options'}")
    settings = method.settings(**given)
    dtype = values["dtype"]
    if dtype not in DTYPES:
        raise MethodError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if values["format"] not in FORMATS:
        raise MethodError(f"unknown --format {values['format']!r}; choose one of {', '.join(FORMATS)}")
    if values["format"] == "transformers.js" and method.relevance_mode(settings) is not None:
        raise MethodError(f"--format transformers.js: method {method.name!r} reads instruction relevance, but "
                          "Transformers.js gives the vision encoder pixel_values only; pass --relevance none (the "
                          "relevance term omitted: phi = s_hat^beta) or use --format native")
    model = values["model"]
    name = model or entry.default_preset
    if model is not None and model not in entry.presets:
        check_checkpoint(resolve_model_path(model), entry.name)  # refuse another kind before any weights
    if values["clip"] is not None:
        if model is None or model in entry.presets:
            raise ModelError(f"--clip applies to a checkpoint given with --model; the built-in '{name}' preset "
                             "carries its own CLIP text tower (sharing its random vision tower)")
        resolve_clip_path(values["clip"])  # a missing folder or another kind of model: refused now
    output = values["output"]
    if output is None:
        output = default_output(entry, model, method.name, method.budget(settings) if method.prunes else None)
    force = values["force"]
    check_output_folder(output, force=force)  # before loading anything; checked again when writing
    if model is None:
        err.print(f"[bold]--model not given: using the built-in '{entry.default_preset}' preset[/] "
                  f"(random weights, seed {values['seed']}, {entry.summary.split(':')[0]} geometry)")
    start = time.perf_counter()
    try:
        with err.status("loading the model") as status:
            from fsr.models.spec import TORCH_DTYPES  # noqa: PLC0415 (torch: after the arguments are checked)

            # loaded (or built) in the export dtype: the exporter then copies nothing
            loaded = load_model(model, family=entry.name, clip=values["clip"], seed=values["seed"],
                                dtype=TORCH_DTYPES[dtype])
            n_image = get_spec(entry.name).num_image_tokens(loaded.config)
            identity = method.identity_note(settings, n_image)
            if identity:
                print_note(identity)
            export_settings = fsr.export.ExportSettings(method.name, dtype=dtype, settings=settings,
                                                        format=values["format"])

            def progress(step: str) -> None:
                err.log(step)
                status.update(step)

            fsr.export.export_model(loaded, output, export_settings, force=force, progress=progress)
    except KeyboardInterrupt as exc:  # fsr.files.Interrupted says what became of the output
        err.print(f"[red]{exc or 'interrupted: nothing was written'}[/]")
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    err.print(f"[green]exported[/] {output} in {time.perf_counter() - start:.1f} s "
              f"({get_spec(entry.name).describe_method(loaded.config, method, settings)}, {dtype}, "
              f"{values['format']} layout)")


for _entry in FAMILIES.values():
    app.command(name=_entry.name, help=None)(_make_family_command(_entry))


def main() -> None:
    exit_program(run_app(app, prog_name="fsr-export"))


if __name__ == "__main__":
    main()
