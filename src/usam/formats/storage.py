"""Rules shared by the on-disk formats (image shards and embedding shards).

WebDataset splits member names at the first dot, so sample keys keep to
[A-Za-z0-9_-]; manifests are written atomically and carry a format version so
that a set written by another version fails with what to do instead of a
confusing error further on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_key(key: str, error: type[Exception]) -> str:
    if not KEY_PATTERN.match(key):
        raise error(
            f"sample key {key!r} may only contain letters, digits, '_' and '-' "
            "(no dots or slashes: WebDataset splits file names at the first dot)"
        )
    return key


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest_payload(
    directory: str | Path, name: str, version: int, error: type[Exception], what: str, redo: str
) -> dict[str, Any]:
    """The JSON of a finished set's manifest, checked for presence and format version."""
    path = Path(directory) / name
    if not path.is_file():
        raise error(
            f"no {name} in {directory}: the {what} is missing or was interrupted before it "
            "finished; run the job that writes it again (it resumes where it stopped)"
        )
    payload = json.loads(path.read_text())
    payload.pop("counts", None)
    if payload.get("format_version") != version:
        raise error(
            f"{path}: {what} format version {payload.get('format_version')} is not "
            f"{version}; {redo} with this version of usam"
        )
    return payload


def listed_shards(
    directory: str | Path, shards: list[dict[str, Any]], manifest_name: str, error: type[Exception]
) -> list[Path]:
    """The shard files a manifest lists, in its order; fails on a missing one."""
    paths = [Path(directory) / shard["name"] for shard in shards]
    for path in paths:
        if not path.is_file():
            raise error(f"{path} is listed in {manifest_name} but missing")
    return paths


def sequential_dataset(paths: Sequence[str | Path]) -> wds.WebDataset:
    """Raw samples of ``paths`` in order, all in this process (no node or worker split)."""
    return wds.WebDataset(
        [str(p) for p in paths],
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
    )
