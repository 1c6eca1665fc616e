"""The log of images that could not be used (``rejected.jsonl``): written by each rank as it
goes, merged at the end, and read back so that a resumed run skips them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from usam.formats.storage import atomic_write_text

REJECTED_NAME = "rejected.jsonl"


@dataclass(frozen=True)
class Rejected:
    """An image that could not be used; travels from the loader to the writer."""

    key: str
    path: str
    reason: str


def _rejections(paths: list[Path]) -> dict[str, str]:
    """Key -> JSON line of every rejection logged in ``paths``, the first one per image."""
    lines: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                lines.setdefault(json.loads(line)["key"], line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut off by a crash: the image is simply tried again
    return lines


def rejected_keys(out_dir: Path) -> set[str]:
    return set(_rejections(sorted(out_dir.glob("rejected*.jsonl"))))


def merge_rejected(out_dir: Path) -> None:
    """Fold the per-rank rejection logs into ``rejected.jsonl`` (one line per image)."""
    parts = sorted(out_dir.glob("rejected-r*.jsonl"))
    merged = _rejections([out_dir / REJECTED_NAME, *parts])
    if merged:
        atomic_write_text(out_dir / REJECTED_NAME, "".join(line + "\n" for line in merged.values()))
    for path in parts:
        path.unlink()
