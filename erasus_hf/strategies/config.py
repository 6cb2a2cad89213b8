"""`StrategyConfig`: a strategy's hyperparameters as a typed dataclass, as PEFT's `LoraConfig` and TRL's configs are.

Each strategy declares its hyperparameters once, as the fields of a `StrategyConfig` subclass beside it, each with
its published default and `metadata={"help": ...}`; `erasus-hf unlearn --help-strategy NAME` prints them. The config
is built from `strategy_kwargs` (a dict from Python, a JSON string from the command line, a YAML mapping from a
recipe), and every value is converted to its field's annotated type on construction: strings from the command line
or a YAML recipe (which reads `1e-3` as a string) once, numbers must be finite, an int is not a bool.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar


class HyperparameterError(ValueError):
    """A value that does not fit its hyperparameter (the strategy that owns the config prefixes its name)."""


@dataclasses.dataclass
class StrategyConfig:
    """Base of every strategy's config: no hyperparameters. Subclasses add dataclass fields, each with a default and
    `metadata={"help": "..."}`, and validate values that a type cannot express in `__post_init__` (after calling
    this one, which converts every field to its annotated type)."""

    # whether `config_from_signature` made this config from a strategy's `__init__` (the compatibility path)
    from_signature: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            if f.name not in hints:
                continue
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, _convert(value, hints[f.name]))
            except _Unconvertible as err:
                raise HyperparameterError(
                    f"hyperparameter {f.name!r} must be {err}, got {value!r} ({type(value).__name__}). "
                    f"Fix strategy_kwargs={{{f.name!r}: ...}}."
                ) from None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The hyperparameters by name, values as held (not deep-copied: members of an ensemble stay specs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) of each hyperparameter, for `--help-strategy`."""
        hints = _field_types(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            hint = hints.get(f.name, f.type)
            kind = hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")  # float, list[int]
            rows.append((f.name, kind, default, f.metadata.get("help", "")))
        return rows


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config's fields (strings under `from __future__ import annotations`)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: those values are left to the config's own checks
        return {}


class _Unconvertible(ValueError):
    """A value that does not fit an annotation (internal: turned into the message naming the hyperparameter)."""


BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
SCALARS = (bool, int, float, str)


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as the annotated type: strings (from the command line or a YAML recipe, which reads `1e-3` as a
    string) are converted once, numbers must be finite, an int is not a bool; annotations other than scalars, their
    lists and dicts, and their unions with None are not checked (their `__init__` validates them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in options:
            return value
        for option in options:
            try:
                return _convert(value, option)
            except _Unconvertible:
                continue
        raise _Unconvertible(" or ".join(_describe(o) for o in options))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_STRINGS:
            return BOOL_STRINGS[value.strip().lower()]
        raise _Unconvertible("a bool (true or false)")
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Unconvertible("an int") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Unconvertible("an int")
    if annotation is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Unconvertible("a finite number") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise _Unconvertible("a finite number")
        return float(number)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Unconvertible("a string")
    if origin in (list, tuple, collections.abc.Sequence) and len(args) == 1 and args[0] in SCALARS:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Unconvertible(_describe(annotation))
        return [_convert(v, args[0]) for v in value]
    if origin in (dict, collections.abc.Mapping) and len(args) == 2 and all(a in SCALARS for a in args):
        if not isinstance(value, collections.abc.Mapping):
            raise _Unconvertible(_describe(annotation))
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    return value


def _describe(annotation: Any) -> str:
    names = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if typing.get_origin(annotation) is not None:  # list[int], dict[str, str]
        return f"a {str(annotation).replace('typing.', '')}"
    return f"a {getattr(annotation, '__name__', annotation)}"


def config_from_signature(owner: type, init: Callable) -> type[StrategyConfig]:
    """A `StrategyConfig` subclass whose fields are the keyword parameters of `init` (their annotations and
    defaults): the config of a strategy written with hyperparameters as `__init__` arguments, as user-defined
    strategies may be. The built-in strategies declare theirs."""
    hints = typing.get_type_hints(init) if init.__annotations__ else {}
    fields = []
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        default = dataclasses.field() if p.default is p.empty else dataclasses.field(default=p.default)
        fields.append((p.name, hints.get(p.name, Any), default))
    return dataclasses.make_dataclass(
        f"{owner.__name__}Config", fields, bases=(StrategyConfig,), namespace={"from_signature": True}
    )
