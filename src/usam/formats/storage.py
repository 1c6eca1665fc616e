"""Rules shared by the on-disk formats (image shards and embedding shards).

WebDataset splits member names at the first dot, so sample keys keep to
[A-Za-z0-9_-]; manifests are written atomically and carry a format version so
that a set written by another version fails with what to do instead of a
confusing error further on.

A set's location is a local folder (a ``Path``) or a URL of object storage (``s3://``,
``gs://``, ``https://``, kept as a ``str``: ``Path`` would fold its ``//``). Every file
operation on a location goes through this module, which reaches URLs through fsspec and
teaches WebDataset's ``gopen`` to stream them. A finished file reaches a URL in one PUT
(object stores replace an object atomically), so readers never see half of one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from usam.core.errors import UsageError

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")
Location = Path | str  # a local folder or file, or the URL of one in object storage


class StorageError(UsageError):
    """A URL whose storage cannot be reached with what is installed."""


def location(value: str | Path) -> Location:
    """What ``value`` names: a URL of ``URL_SCHEMES`` stays a str, anything else is a Path."""
    text = str(value)
    scheme, separator, _ = text.partition("://")
    if separator and scheme.lower() in URL_SCHEMES:
        return text.rstrip("/")
    return Path(value)


def is_url(where: str | Path) -> bool:
    return isinstance(location(where), str)


def join(where: Location, *names: str) -> Location:
    if is_url(where):
        return "/".join([where.rstrip("/"), *names])
    return Path(where).joinpath(*names)


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as missing:
        raise StorageError(
            f"{url}: {missing}; pip install 'usam[cloud]' installs s3fs and gcsfs"
        ) from missing


def is_file(where: Location) -> bool:
    if not is_url(where):
        return Path(where).is_file()
    fs, path = _filesystem(where)
    fs.invalidate_cache(path)  # another process may have written it since we last looked
    return fs.isfile(path)


def read_text(where: Location) -> str:
    if not is_url(where):
        return Path(where).read_text()
    fs, path = _filesystem(where)
    return fs.cat_file(path).decode()


def read_json(where: Location, *, missing: Any) -> Any:
    """The JSON at ``where``, or ``missing`` when there is no file."""
    return json.loads(read_text(where)) if is_file(where) else missing


def open_binary(where: Location) -> BinaryIO:
    """``where`` for reading front to back (HTTP without range requests too)."""
    if not is_url(where):
        return open(where, "rb")
    fs, path = _filesystem(where)
    if fs.protocol[0].startswith("http"):
        return fs.open(path, "rb", block_size=0)  # streamed: servers need not serve ranges
    return fs.open(path, "rb")


def _file_sizes(directory: Location, pattern: str) -> dict[str, int]:
    """Name -> size of the files in ``directory`` that match the glob ``pattern``, sorted by
    name; none when it does not exist."""
    if not is_url(directory):
        paths = sorted(p for p in Path(directory).glob(pattern) if p.is_file())
        return {path.name: path.stat().st_size for path in paths}
    fs, path = _filesystem(directory)
    fs.invalidate_cache(path)  # another process may have written there since we last looked
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    files = (entry for entry in entries if entry["type"] == "file")
    # an HTTP listing tells no sizes
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") or 0 for e in files}
    return {name: sizes[name] for name in sorted(fnmatch.filter(sizes, pattern))}


def file_names(directory: Location, pattern: str) -> list[str]:
    return list(_file_sizes(directory, pattern))


def total_bytes(directory: Location, pattern: str) -> int:
    return sum(_file_sizes(directory, pattern).values())


def make_folder(where: Location) -> None:
    """A local folder is made; object storage has no folders, only keys with slashes."""
    if not is_url(where):
        Path(where).mkdir(parents=True, exist_ok=True)


def remove(where: Location) -> None:
    if not is_url(where):
        Path(where).unlink(missing_ok=True)
        return
    fs, path = _filesystem(where)
    if fs.exists(path):
        fs.rm_file(path)


def staging_folder(directory: Location, stale: str = "") -> Path:
    """The local folder where files bound for ``directory`` are written until they are
    complete: ``directory`` itself when local, else a folder of this machine's temporary
    space named by the URL. Files matching the glob ``stale`` there, left by an interrupted
    run, are deleted: they were never complete, so never published."""
    if is_url(directory):
        digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / "usam-staging" / digest
    else:
        folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob(stale) if stale else ():
        path.unlink()
    return folder


def publish(finished: Path, destination: Location) -> None:
    """Move a complete local file to ``destination``: a rename, or one upload."""
    if not is_url(destination):
        os.replace(finished, destination)
        return
    fs, path = _filesystem(destination)
    fs.put_file(str(finished), path)
    finished.unlink()


def _open_url(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any) -> BinaryIO:
    """WebDataset's opener for the URL schemes: the same fsspec filesystems as the rest."""
    if mode != "rb":
        raise StorageError(f"{url}: shards at a URL are only read by WebDataset")
    return open_binary(url)


for _scheme in URL_SCHEMES:
    gopen_schemes[_scheme] = _open_url


def check_key(key: str, error: type[Exception]) -> str:
    if not KEY_PATTERN.match(key):
        raise error(
            f"sample key {key!r} may only contain letters, digits, '_' and '-' "
            "(no dots or slashes: WebDataset splits file names at the first dot)"
        )
    return key


def writers_tmp(path: Path) -> Path:
    """Where one writer stages ``path`` before replacing it: a name of its own (process and
    thread), since DDP ranks write the same manifest at once, and with one shared name a
    rank's replace found the file another had already moved."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def atomic_write_text(path: Location, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    if is_url(path):
        fs, key = _filesystem(path)
        fs.pipe_file(key, text.encode())  # one PUT
        return
    tmp = writers_tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest_payload(
    directory: str | Path, name: str, version: int, error: type[Exception], what: str, redo: str
) -> dict[str, Any]:
    """The JSON of a finished set's manifest, checked for presence and format version."""
    path = join(location(directory), name)
    if not is_file(path):
        raise error(
            f"no {name} in {directory}: the {what} is missing or was interrupted before it "
            "finished; run the job that writes it again (it resumes where it stopped)"
        )
    payload = json.loads(read_text(path))
    payload.pop("counts", None)
    if payload.get("format_version") != version:
        raise error(
            f"{path}: {what} format version {payload.get('format_version')} is not "
            f"{version}; {redo} with this version of usam"
        )
    return payload


def listed_shards(
    directory: str | Path, shards: list[dict[str, Any]], manifest_name: str, error: type[Exception]
) -> list[Location]:
    """The shard files a manifest lists, in its order; fails on a missing one."""
    paths = [join(location(directory), shard["name"]) for shard in shards]
    for path in paths:
        if not is_file(path):
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
