"""Class vocabularies: the class names a run is about, the only input U-SAM needs.

A vocabulary is a packaged name (``voc20``, ``coco80``, ``voc_superclasses``), a
path to a JSON file, or an inline list of names. The JSON file holds either a list of
names (``["cat", "dog"]``, named after the file) or the packaged ones' shape:
``{"name": "pets", "classes": ["cat", "dog"]}``, with ``"parent"`` and ``"members"``
for superclasses (``{"parent": "voc20", "members": {"animals": ["cat", ...]}}``).
Names are normalised (trimmed, inner whitespace collapsed, lower case) so that the
same class written twice cannot slip in as two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from usam.core.errors import UsageError

PACKAGED = ("voc20", "coco80", "voc_superclasses")


class VocabularyError(UsageError, ValueError):
    """A class list that cannot be used: unknown name, empty or duplicated class."""


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[str, ...]
    parent: str | None = None
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def parent_label_map(self) -> dict[int, int]:
        """Map 0-based class indices of the parent vocabulary to this one's (superclass runs)."""
        if self.parent is None:
            raise VocabularyError(f"vocabulary '{self.name}' has no parent vocabulary to map from")
        parent = load_vocabulary(self.parent)
        mapping = {}
        for own_index, group in enumerate(self.classes):
            for member in self.members[group]:
                mapping[parent.classes.index(member)] = own_index
        return mapping


def normalise_name(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().lower()


def check_classes(names: Sequence[str], source: str) -> tuple[str, ...]:
    """Normalise names; fail on empty lists, empty names and duplicates, naming ``source``."""
    normalised = [normalise_name(n) for n in names]
    if not normalised:
        raise VocabularyError(f"{source}: the class list is empty; give at least one class name")
    for position, (raw, name) in enumerate(zip(names, normalised)):
        if not name:
            raise VocabularyError(f"{source}: class {position} ({raw!r}) is empty after trimming")
    seen: dict[str, int] = {}
    for position, name in enumerate(normalised):
        if name in seen:
            raise VocabularyError(
                f"{source}: class '{name}' appears twice (positions {seen[name]} and {position}); "
                "remove the duplicate"
            )
        seen[name] = position
    return tuple(normalised)


JSON_SHAPES = 'a list of class names, or {"classes": [...]}'


def _from_json(text: str, source: str) -> Vocabulary:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise VocabularyError(f"{source} is not JSON ({error}); give {JSON_SHAPES}") from None
    if isinstance(payload, list):
        payload = {"classes": payload}
    if not isinstance(payload, dict) or not isinstance(payload.get("classes"), list):
        raise VocabularyError(f"{source}: a vocabulary file holds {JSON_SHAPES}")
    classes = check_classes(payload["classes"], source)
    members = {
        normalise_name(group): check_classes(names, f"{source} members of '{group}'")
        for group, names in payload.get("members", {}).items()
    }
    missing = set(members) ^ set(classes) if members else set()
    if missing:
        raise VocabularyError(f"{source}: 'members' and 'classes' disagree on {sorted(missing)}")
    return Vocabulary(
        name=payload.get("name", Path(source).stem),
        classes=classes,
        parent=payload.get("parent"),
        members=members,
    )


def load_vocabulary(spec: str | Sequence[str]) -> Vocabulary:
    """Resolve a packaged name, a JSON path or an inline list of class names."""
    if isinstance(spec, str):
        if spec in PACKAGED:
            text = resources.files("usam").joinpath("vocabularies", f"{spec}.json").read_text()
            return _from_json(text, f"vocabulary '{spec}'")
        path = Path(spec)
        if path.suffix == ".json" and path.is_file():
            return _from_json(path.read_text(), str(path))
        raise VocabularyError(
            f"unknown vocabulary {spec!r}: use one of {', '.join(PACKAGED)}, a path to a JSON "
            f"file ({JSON_SHAPES}), or an inline list of class names"
        )
    return Vocabulary(name="custom", classes=check_classes(list(spec), "inline class list"))
