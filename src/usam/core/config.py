"""Config groups become typed settings once, at the entry point, so a misspelt or mistyped
key fails at once, by its full name, instead of deep inside a long job."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from usam.core.errors import UsageError

T = TypeVar("T")


def register_resolvers() -> None:
    """``${usam.cwd:}``: the folder the command started in. Hydra's ``${hydra:runtime.cwd}``
    is unset while a multirun resolves its sweep directory, so paths cannot rely on it."""
    if not OmegaConf.has_resolver("usam.cwd"):
        OmegaConf.register_new_resolver("usam.cwd", os.getcwd)


class ConfigError(UsageError, ValueError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


def _plain(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def _unknown_key_message(group: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {group}.{close[0]}" if close else f"; valid keys: {', '.join(known)}"
    return f"unknown key {group}.{key}{hint}"


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits the field annotation (the few kinds settings use)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list) or annotation in (tuple, list):
        return isinstance(value, list | tuple)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # an annotation these checks do not model: the dataclass checks it


def settings_from_config(
    cls: type[T],
    config: Mapping[str, Any] | DictConfig,
    group: str,
    error: type[Exception] = ConfigError,
) -> T:
    """``cls(**config)`` after checking every key and value type; calls ``check()`` if present.

    ``group`` is the config path the keys live under (``amg``, ``model.teacher``), so an
    error names the exact key to fix on the command line.
    """
    values = _plain(config)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in values.items():
        if key not in known:
            raise error(_unknown_key_message(group, key, known))
        if not _accepts(hints[key], value):
            raise error(
                f"{group}.{key}={value!r} has the wrong type: expected {hints[key]}"
                if not isinstance(hints[key], type)
                else f"{group}.{key}={value!r} has the wrong type: expected {hints[key].__name__}"
            )
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            values[key] = tuple(value)
    try:
        settings = cls(**values)
        check = getattr(settings, "check", None)
        if check is not None:
            check()
    except ConfigError:
        raise
    except ValueError as reason:
        raise error(f"{group}: {reason}") from reason
    return settings


def _type_name(annotation: Any) -> str:
    """How a type reads in an error line: ``int or None`` for ``Optional[int]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


@dataclasses.dataclass(frozen=True)
class Count:
    """The integers an argument takes: at least ``minimum``, or one of ``special`` (value,
    meaning), such as Lightning's ``-1`` for all devices."""

    minimum: int
    special: tuple[tuple[int, str], ...] = ()

    def allows(self, value: int) -> bool:
        return value >= self.minimum or value in dict(self.special)

    def describe(self) -> str:
        others = "".join(f", or {value} ({meaning})" for value, meaning in self.special)
        return f"at least {self.minimum}{others}"


def check_target_arguments(
    config: Mapping[str, Any] | DictConfig,
    group: str,
    counts: Mapping[str, Count],
    error: type[Exception] = ConfigError,
) -> None:
    """Check a ``_target_`` entry's values before it is built, as settings are checked: each
    key must be a parameter of the target (else the closest one is named), each value of
    the parameter's annotated type, and each integer of ``counts`` in its range. What
    Lightning's Trainer or a DataModule would refuse later, after images, shards and ranks
    were made, or in a loader's traceback, ends here in one line naming the key."""
    values = _plain(config)
    target = get_object(values.pop("_target_"))
    parameters = inspect.signature(target).parameters
    hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    known = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    for key, value in values.items():
        if key.startswith("_") and key.endswith("_"):
            continue  # Hydra's own: _convert_, _partial_, _recursive_
        if key not in known:
            raise error(_unknown_key_message(group, key, known))
        if key in hints and not _accepts(hints[key], value):
            raise error(
                f"{group}.{key}={value!r} has the wrong type: expected {_type_name(hints[key])}"
            )
        count = counts.get(key)
        if count is not None and _accepts(int, value) and not count.allows(value):
            raise error(f"{group}.{key}={value} is out of range: {count.describe()}")
