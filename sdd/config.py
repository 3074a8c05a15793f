"""Stage configuration: sdd's own options plus every field of the wrapped TRL config, in layers.

TRL already declares hundreds of training options with help and defaults; sdd re-declares
none of them. A stage has a small dataclass of its own options (which model, which data,
sampling for teacher completions...) and a TRL config class. Values come in layers, later
winning: sdd's recipe defaults for the stage, the run dir's `config.yaml` section for the
stage, `--config FILE`, the subcommand's options, then `--set key=value`. A key that belongs to
neither dataclass is an error that names it, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sdd.errors import SddError

RUN_CONFIG_NAME = "config.yaml"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SddError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SddError(f"{path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SddError(f"{path} must be a mapping of option: value")
    return data


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs; values stay text until the target field's type is known."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SddError(f"--set {item!r} must look like key=value (e.g. --set learning_rate=1e-5)")
        parsed[key.strip().replace("-", "_")] = value
    return parsed


def help_for(options_cls, name: str) -> str:
    """The help an options dataclass declares on its field `name` (`metadata={"help": ...}`, as TRL's configs do).

    The one source of an option's help: the CLI's `--help`, `--help-config` and the docs read it here.
    """
    return options_cls.__dataclass_fields__[name].metadata["help"]


def describe_fields(cls, defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every field `resolve` accepts from the dataclass `cls`: name, type, default and help, in declaration order.

    `defaults` are the values a stage sets before any layer (its own recipe defaults for TRL fields); a
    field they cover shows that default, and the class's own as `class_default`.
    """
    defaults = defaults or {}
    described = []
    for name, tp in _field_types(cls).items():
        field = cls.__dataclass_fields__[name]
        if field.default is not dataclasses.MISSING:
            own = field.default
        elif field.default_factory is not dataclasses.MISSING:
            own = field.default_factory()
        else:
            own = None
        entry = {"name": name, "type": type_name(tp), "default": to_jsonable(defaults.get(name, own)),
                 "help": " ".join(str(field.metadata.get("help", "")).split())}
        if name in defaults and to_jsonable(own) != entry["default"]:
            entry["class_default"] = to_jsonable(own)
        described.append(entry)
    return described


def type_name(tp) -> str:
    """A type hint as a reader writes it: `int | None`, `list[str]`, `'hf' | 'vllm'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        inner = f"[{', '.join(type_name(arg) for arg in args)}]" if args else ""
        return f"{getattr(origin, '__name__', str(origin))}{inner}"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _accepted(tp) -> list:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(tp) for a in _accepted(arg)]
    return [tp]


_NO = object()


def _convert(value: Any, option) -> Any:
    """`value` as an instance of `option`, or _NO when it is not one (conversions are the lossless ones)."""
    if option is Any:
        return value
    if option is type(None):
        return None if value is None else _NO
    origin = typing.get_origin(option)
    if origin is typing.Literal:
        return value if value in typing.get_args(option) else _NO
    base = origin or option
    if base is bool:
        return value if isinstance(value, bool) else _NO
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if base is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if base in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value] if isinstance(value, str) else _NO  # `--set report_to=wandb` for a list field
    if base is dict:
        return value if isinstance(value, dict) else _NO
    if base is str:
        return value if isinstance(value, str) else _NO
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return value if isinstance(value, base) or value in {e.value for e in base} else _NO
    return value  # anything richer is left to the config class's own validation


def _text_readings(text: str) -> list[Any]:
    """What `--set key=TEXT` may mean, most specific first: YAML (bools, lists, null), a number, the text."""
    readings: list[Any] = []
    try:
        readings.append(yaml.safe_load(text) if text.strip() else text)
    except yaml.YAMLError:
        pass
    try:  # YAML 1.1 reads "1e-5" as text; users mean the number
        readings.append(float(text))
    except ValueError:
        pass
    return [*readings, text]


def coerce(key: str, value: Any, tp, *, from_text: bool) -> Any:
    """Bring a value to the field's type, or fail naming the key and the type it wanted."""
    options = _accepted(tp)
    candidates = _text_readings(value) if from_text and isinstance(value, str) else [value]
    for candidate in candidates:
        for option in options:
            converted = _convert(candidate, option)
            if converted is not _NO:
                return converted
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise SddError(f"option '{key}' = {value!r} has the wrong type: expected {wanted}")


@dataclasses.dataclass
class Layer:
    """One source of values, remembered by name so errors can say where a bad key came from."""

    source: str
    values: dict[str, Any]
    from_text: bool = False


def resolve(options_cls, trl_cls, layers: list[Layer]) -> tuple[Any, dict[str, Any]]:
    """Merge layers into (sdd options instance, TRL config kwargs); unknown keys and bad types are errors."""
    own_types = _field_types(options_cls)
    trl_types = _field_types(trl_cls) if trl_cls is not None else {}
    own: dict[str, Any] = {}
    trl: dict[str, Any] = {}
    for layer in layers:
        for raw_key, value in layer.values.items():
            key = raw_key.replace("-", "_")
            if key in own_types:
                own[key] = coerce(key, value, own_types[key], from_text=layer.from_text)
            elif key in trl_types:
                trl[key] = coerce(key, value, trl_types[key], from_text=layer.from_text)
            else:
                known = list(own_types) + list(trl_types)
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                what = trl_cls.__name__ if trl_cls is not None else "this stage"
                raise SddError(f"unknown option '{raw_key}' in {layer.source}: not an sdd option nor a {what} field{hint}")
    try:
        options = options_cls(**own)
    except (TypeError, ValueError) as err:
        raise SddError(f"invalid options: {err}") from None
    return options, trl


def build_trl_config(trl_cls, kwargs: dict[str, Any]):
    """Instantiate the TRL config, turning its validation errors into one-line user errors."""
    try:
        return trl_cls(**kwargs)
    except (TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SddError(f"invalid {trl_cls.__name__}: {message}") from None


def run_defaults(run_path: Path, stage: str) -> dict:
    """The run dir's own defaults for a stage (`config.yaml`, section per stage), e.g. the toy's small sizes."""
    path = Path(run_path) / RUN_CONFIG_NAME
    if not path.is_file():
        return {}
    section = load_yaml(path).get(stage) or {}
    if not isinstance(section, dict):
        raise SddError(f"{path}: section '{stage}' must be a mapping of option: value")
    return section


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
