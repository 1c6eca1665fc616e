"""What an ingest reads before anything is fetched: a URL list or a folder tree, each turned
into :class:`Entry` items with their class checked against the vocabulary.

A URL list is CSV (a header with ``url`` and ``class`` columns) or JSONL (one
``{"url": ..., "class": ...}`` per line), the shape img2dataset users know. A local tree is
``root/<class>/**/*.jpg`` (any common image suffix); folder names are matched to the
vocabulary as class names, with ``_`` read as a space. A class given as a member of a
superclass (``cat`` under ``voc_superclasses``) resolves to its superclass, with the member
recorded.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usam.core.vocabulary import Vocabulary, normalise_name
from usam.formats.image_shards import IMAGE_SUFFIXES
from usam.images.ingest_settings import IngestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One thing to ingest: a URL (with its line in the list) or a file (relative path)."""

    ident: str  # the URL or the relative path: what failed.jsonl and resuming go by
    class_index: int
    class_name: str
    member: str | None
    line: int | None = None
    path: Path | None = None


def resolve_class(vocab: Vocabulary, raw: str) -> tuple[int, str | None] | None:
    """(class index, member) for a class or a superclass member; None when unknown."""
    candidates = dict.fromkeys((normalise_name(raw), normalise_name(str(raw).replace("_", " "))))
    for name in candidates:
        if name in vocab.classes:
            return vocab.classes.index(name), None
    for index, group in enumerate(vocab.classes):
        for name in candidates:
            if name in vocab.members.get(group, ()):
                return index, name
    return None


def _unknown_classes_error(vocab: Vocabulary, where: str, unknown: Iterable[str]) -> IngestError:
    return IngestError(
        f"{where}: {', '.join(unknown)} not a class of vocabulary '{vocab.name}' "
        f"({', '.join(vocab.classes)}); fix the names or set data.classes to a list that has them"
    )


def _url_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise IngestError(f"{path} line {number} is not JSON ({error})") from error
                if not isinstance(row, dict):
                    raise IngestError(f"{path} line {number} is not a JSON object")
                yield number, row
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "url" not in columns or "class" not in columns:
                raise IngestError(
                    f"{path}: the header must name 'url' and 'class' columns (found {columns})"
                )
            for number, row in enumerate(reader, start=2):
                yield number, {k.strip().lower(): v for k, v in row.items() if k}
    else:
        raise IngestError(f"{path}: a URL list must be .csv, .tsv or .jsonl (with url,class)")


def read_url_list(path: str | Path, vocab: Vocabulary) -> list[Entry]:
    """The entries of a URL list, first occurrence of each URL only; unknown classes fail."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"URL list {path} does not exist")
    entries: dict[str, Entry] = {}
    unknown: dict[str, int] = {}
    for number, row in _url_rows(path):
        url = str(row.get("url") or "").strip()
        raw_class = str(row.get("class") or "").strip()
        if not url or not raw_class:
            raise IngestError(f"{path} line {number}: both 'url' and 'class' are needed")
        resolved = resolve_class(vocab, raw_class)
        if resolved is None:
            unknown.setdefault(repr(raw_class), number)
            continue
        index, member = resolved
        entries.setdefault(url, Entry(url, index, vocab.classes[index], member, line=number))
    if unknown:
        where = [f"{name} (line {line})" for name, line in list(unknown.items())[:10]]
        raise _unknown_classes_error(vocab, str(path), where)
    return list(entries.values())


def scan_folder(root: str | Path, vocab: Vocabulary) -> list[Entry]:
    """Image files under root/<class>/, sorted; unknown class folders fail."""
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise IngestError(f"{root} has no class folders; lay images out as {root}/<class>/*.jpg")
    unknown = [repr(f.name) for f in folders if resolve_class(vocab, f.name) is None]
    if unknown:
        raise _unknown_classes_error(vocab, f"class folder(s) in {root}", unknown)
    entries = []
    for folder in folders:
        index, member = resolve_class(vocab, folder.name)
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            log.warning("class folder %s holds no images", folder)
        for file in files:
            rel = file.relative_to(root).as_posix()
            entries.append(Entry(rel, index, vocab.classes[index], member, path=file))
    return entries
