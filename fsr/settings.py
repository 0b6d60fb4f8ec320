"""Typed, validated settings whose command-line options are declared beside them.

A settings class is a frozen dataclass deriving from `Settings`; each field is declared
with `setting(...)`, which records the option's help text, its flag, the values it may
take and its range::

    @dataclasses.dataclass(frozen=True)
    class FsrSettings(Settings):
        budget: int = setting(64, help="Image tokens the LLM keeps", minimum=1)
        rho: float = setting(0.9, help="Focus mass", minimum=0.0, exclusive_minimum=True, maximum=1.0)

From that one declaration come: validation with messages that name the option and the
rule (`Settings.validate`, called on construction), construction from command-line values
where ``None`` means "not given" (`Settings.from_options`), the JSON form written into
manifests (`Settings.to_json` / `Settings.from_json`), and the typer options the CLIs
generate (`fsr.cli`). A subclass adds rules that involve several fields in ``check()``.

This module is light (no torch, no onnx): the CLIs read settings classes at start-up.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar

from fsr.errors import FsrError


#: The precisions an export is made in (graphs and ``source/``).
DTYPES = ("fp32", "fp16")
#: export layouts (``fsr-export --format``): ours, or one Transformers.js runs as it is (fsr.export.transformers_js)
FORMATS = ("native", "transformers.js")


class SettingsError(FsrError, ValueError):
    """A setting has a bad value; the message names the option, the rule and the value."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """What the command line needs to know about one setting."""

    help: str
    flag: str | None = None  # default: --field-name
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    cli: bool = True  # False: a setting of the Python API only
    hint: str = ""  # appended to every message about this setting: what it means, what to do


def setting(default: Any, *, help: str, flag: str | None = None, choices: tuple | None = None,
            minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False,
            cli: bool = True, hint: str = "") -> Any:
    """A dataclass field carrying its command-line option (see the module docstring)."""
    info = OptionInfo(help, flag, tuple(choices) if choices is not None else None, minimum, maximum,
                      exclusive_minimum, cli, hint)
    return dataclasses.field(default=default, metadata={"fsr": info})


@dataclasses.dataclass(frozen=True)
class SettingField:
    name: str
    type: Any
    default: Any
    info: OptionInfo

    @property
    def flag(self) -> str:
        return self.info.flag or "--" + self.name.replace("_", "-")

    @property
    def base_type(self):
        """The type without ``None`` (``int | None`` -> int)."""
        return _base_type(self.type)


def _base_type(tp):
    """``int | None`` -> int; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every settings class (see the module docstring)."""

    #: Shown in messages: "fsr setting --budget ...".
    label: ClassVar[str] = "setting"

    def __post_init__(self) -> None:
        self.validate()

    # -- declaration --------------------------------------------------------------------

    @classmethod
    def fields(cls) -> list[SettingField]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            info = f.metadata.get("fsr") or OptionInfo(help="")
            out.append(SettingField(f.name, hints[f.name], f.default, info))
        return out

    # -- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        for f in self.fields():
            self._check_field(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules involving several fields (subclasses)."""

    def _fail(self, f: SettingField, rule: str, value: Any) -> None:
        hint = f": {f.info.hint}" if f.info.hint else ""
        raise SettingsError(f"{self.label} setting {f.flag} {rule} (got {value!r}){hint}")

    def _check_field(self, f: SettingField, value: Any) -> None:
        tp = _base_type(f.type)
        if value is None:
            if _base_type(f.type) is f.type:  # not Optional
                self._fail(f, "needs a value", value)
            return
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(f, "must be an integer", value)
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self._fail(f, "must be a number", value)
            if not math.isfinite(value):
                self._fail(f, "must be a finite number", value)
        elif tp is str:
            if not isinstance(value, str):
                self._fail(f, "must be a string", value)
        elif tp is bool:
            if not isinstance(value, bool):
                self._fail(f, "must be true or false", value)
        info = f.info
        kind = "an integer " if tp is int else ""
        if info.choices is not None and value not in info.choices:
            self._fail(f, f"must be one of {', '.join(map(str, info.choices))}", value)
        if info.minimum is not None:
            if info.exclusive_minimum and not value > info.minimum:
                self._fail(f, f"must be {kind}> {info.minimum:g}", value)
            if not info.exclusive_minimum and not value >= info.minimum:
                self._fail(f, f"must be {kind}>= {info.minimum:g}", value)
        if info.maximum is not None and not value <= info.maximum:
            self._fail(f, f"must be <= {info.maximum:g}", value)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_options(cls, **values: Any):
        """Settings from option values; ``None`` means "not given" (the default applies)."""
        known = {f.name for f in cls.fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown {cls.label} option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def replace(self, **changes: Any):
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.fields()}

    @classmethod
    def from_json(cls, data: Any):
        """Settings from their JSON form (a manifest entry); SettingsError for anything else."""
        if not isinstance(data, dict):
            raise SettingsError(f"{cls.label} settings must be a JSON object, got {type(data).__name__}")
        return cls.from_options(**data)
