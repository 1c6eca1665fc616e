"""Config groups read into dataclasses, so a misspelt key fails at once, by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_config(
    cls: type[T], config: Mapping[str, Any], group: str, error: type[Exception]
) -> T:
    """``cls(**config)`` after checking every key; calls ``check()`` on the result."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise error(f"unknown {group} setting(s) {unknown}; valid ones are {sorted(known)}")
    settings = cls(**dict(config))
    settings.check()
    return settings
