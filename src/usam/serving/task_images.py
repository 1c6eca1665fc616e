"""A task's image, wherever Label Studio keeps it, fetched within a time and a size bound.

``data.<field>`` of a task is one of: ``/data/local-files/?d=REL`` (read from
``document_root`` when set, the folder Label Studio serves local files from), another path
on the Label Studio server such as ``/data/upload/...`` (fetched from ``label_studio_url``
with ``LABEL_STUDIO_API_KEY``, a personal access token or a legacy one, as
``usam.serving.label_studio_token`` sends it; so is a full URL under ``label_studio_url``),
or an ``http(s)://``, ``s3://`` or ``gs://`` URL (through ``usam.formats.storage``). Each
fetch, a token's exchange included, runs in a thread of its own, so a stalled server costs
the request ``limits.fetch_seconds`` and no more; a body over ``limits.image_bytes`` is cut
off unread.
"""

from __future__ import annotations

import io
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

import numpy as np
from PIL import Image

from usam.core.errors import InputFileError
from usam.formats import storage
from usam.formats.image_shards import to_rgb
from usam.inference.label_studio import LOCAL_FILES
from usam.serving.errors import RequestError
from usam.serving.label_studio_token import LabelStudioToken, refused
from usam.serving.limits import Limits

CHUNK = 1 << 20


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        yield from iter(lambda: stream.read(CHUNK), b"")


class TaskImages:
    """Task -> its image as (H, W, 3) uint8 RGB, or a :class:`RequestError` saying why not."""

    def __init__(
        self,
        document_root: str | None,
        label_studio_url: str | None,
        token: str | None,
        limits: Limits,
    ) -> None:
        """``document_root``: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT;
        ``label_studio_url``: where other Label Studio paths are fetched, with ``token``."""
        root = Path(document_root).expanduser().resolve() if document_root else None
        if root is not None and not root.is_dir():
            raise InputFileError(
                f"document_root={document_root} is not a folder; set it to the folder Label "
                "Studio serves local files from (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)"
            )
        self.document_root = root
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.token = (
            LabelStudioToken(self.label_studio_url, token, limits.fetch_seconds)
            if self.label_studio_url and token
            else None
        )
        self.limits = limits

    def __call__(self, task: Mapping, field: str) -> np.ndarray:
        data = task.get("data")
        address = data.get(field) if isinstance(data, Mapping) else None
        what = f"task {task.get('id')}"
        if not isinstance(address, str) or not address:
            raise RequestError(f"{what} has no data.{field}, the image its label config shows")
        body = self._bounded(self._opener(address, what), f"{what}'s image {address}")
        try:
            with Image.open(io.BytesIO(body)) as image:
                image.load()
                return np.asarray(to_rgb(image))
        except Image.UnidentifiedImageError:
            raise RequestError(f"{what}'s image {address} is not an image file", 422) from None
        except (OSError, Image.DecompressionBombError) as error:
            message = f"{what}'s image {address} cannot be decoded: {error}"
            raise RequestError(message, 422) from None

    def _opener(self, address: str, what: str) -> Callable[[], BinaryIO]:
        if address.startswith(LOCAL_FILES) and self.document_root is not None:
            path = (self.document_root / unquote(address.removeprefix(LOCAL_FILES))).resolve()
            if not path.is_relative_to(self.document_root):
                raise RequestError(f"{what}'s image {address} is outside document_root")
            if not path.is_file():
                raise RequestError(
                    f"{what}'s image {address} is not in document_root={self.document_root}; "
                    "set document_root to the folder Label Studio serves local files from",
                    404,
                )
            return lambda: open(path, "rb")
        if self.label_studio_url and address.startswith(self.label_studio_url + "/"):
            return self._label_studio(address.removeprefix(self.label_studio_url), what)
        if address.startswith("/"):
            return self._label_studio(address, what)
        if storage.is_url(address):
            return lambda: storage.open_binary(address)
        raise RequestError(f"{what}'s image {address} is neither a Label Studio path nor a URL")

    def _label_studio(self, address: str, what: str) -> Callable[[], BinaryIO]:
        if not self.label_studio_url:
            raise RequestError(
                f"{what}'s image {address} is served by Label Studio: set label_studio.url "
                "(and the environment variable LABEL_STUDIO_API_KEY), or document_root for "
                "local files"
            )
        url = self.label_studio_url + address

        def open_image() -> BinaryIO:
            headers = {"Authorization": self.token.authorization()} if self.token else {}
            request = urllib.request.Request(url, headers=headers)
            try:
                return urllib.request.urlopen(request, timeout=self.limits.fetch_seconds)
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise refused(f"{what}'s image {address}", error) from None
                raise

        return open_image

    def _bounded(self, opener: Callable[[], BinaryIO], what: str) -> bytes:
        """The whole body, read in a daemon thread that the request stops waiting for."""
        limit, seconds = self.limits.image_bytes, self.limits.fetch_seconds
        late = RequestError(f"{what} was not fetched within limits.fetch_seconds={seconds}", 504)
        outcome: dict[str, Any] = {}

        def read() -> None:
            body = bytearray()
            try:
                for chunk in _chunks(opener()):
                    body += chunk
                    if len(body) > limit:
                        message = f"{what} is larger than limits.image_bytes={limit}"
                        outcome["error"] = RequestError(message, 413)
                        return
                outcome["body"] = bytes(body)
            except RequestError as error:  # the token refused, already said in one line
                outcome["error"] = error
            except Exception as error:  # whatever the transport raises is the request's answer
                timed_out = isinstance(getattr(error, "reason", error), TimeoutError)
                failed = RequestError(f"{what} cannot be fetched: {error}", 502)
                outcome["error"] = late if timed_out else failed

        reader = threading.Thread(target=read, name="task-image", daemon=True)
        reader.start()
        reader.join(seconds)
        if "error" in outcome:
            raise outcome["error"]
        if "body" not in outcome:
            raise late
        return outcome["body"]
