"""Finding, downloading and loading SAM checkpoints, with errors that say what to do.

Resolution order: an explicit path (``sam.checkpoint``), else ``<cache dir>/<file>``
(``sam.cache_dir``, which is ``${paths.cache_dir}/checkpoints``; from Python, without a
config, ``$USAM_CACHE/checkpoints``, default ``~/.cache/usam/checkpoints``), else a
download with torch's own fetcher (``torch.hub.download_url_to_file``): a progress bar,
the SHA-256 checked where one is known, and the file renamed into place only once
complete and verified, so an interrupted or corrupt download never looks like a
checkpoint. With ``USAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded: a
missing checkpoint fails at once instead of waiting on a network that is not there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from usam.core.errors import UsageError
from usam.core.weights import load_weights

log = logging.getLogger(__name__)

CONFIG_KEY = "sam.checkpoint"
CACHE_KEY = "sam.cache_dir"
_CHUNK = 1 << 20


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that is missing, cannot be fetched, is corrupt or belongs to another model."""


def default_cache_dir() -> Path:
    """Where checkpoints are cached when no config names the folder: the default of
    ``paths.cache_dir`` (``$USAM_CACHE``, else ``~/.cache/usam``) plus ``checkpoints``."""
    return Path(os.environ.get("USAM_CACHE") or Path.home() / ".cache" / "usam") / "checkpoints"


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("USAM_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(name: str, url: str | None, why: str, cache_dir: Path) -> CheckpointError:
    source = f"download it from {url} and " if url else ""
    return CheckpointError(
        f"SAM checkpoint {name} is not available ({why}): {source}"
        f"set {CONFIG_KEY}=/path/to/{name}, or place it in {cache_dir} ({CACHE_KEY})"
    )


def download(url: str, dest: str | Path, sha256: str | None, *, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; verify it when ``sha256`` is known.

    torch's fetcher opens the connection without a timeout; ``timeout`` bounds each
    socket operation, so a stalled server fails instead of hanging the run.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256, progress=True)
    except RuntimeError as error:  # the only one torch raises: the SHA-256 differs
        raise CheckpointError(
            f"download of {url} failed its SHA-256 check ({error}); the file was discarded. "
            f"Retry, or fetch it yourself and set {CONFIG_KEY}=/path/to/{dest.name}"
        ) from error
    except OSError as error:  # URLError and HTTPError included
        raise _missing(dest.name, url, f"download failed: {error}", dest.parent) from error
    finally:
        socket.setdefaulttimeout(previous)
    return dest


def resolve(
    name: str,
    url: str | None,
    sha256: str | None,
    *,
    cache_dir: str | Path | None = None,
    explicit: str | Path | None = None,
) -> Path:
    """Path of checkpoint ``name``: the explicit one, the one in ``cache_dir`` (None:
    :func:`default_cache_dir`), or a fresh download into it."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"SAM checkpoint {path} does not exist; fix {CONFIG_KEY} "
                f"(or leave it unset to use the official checkpoint)"
            )
        return path
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    cached = folder / name
    if cached.is_file():
        return cached
    if url is None:
        raise _missing(name, None, "no download address is known for it", folder)
    if offline():
        raise _missing(name, url, "offline: USAM_OFFLINE or HF_HUB_OFFLINE is set", folder)
    return download(url, cached, sha256)


def load_into(
    model: torch.nn.Module,
    path: str | Path,
    model_type: str,
    *,
    identify: Callable[[dict[str, Any]], str | None] | None = None,
    state_key: str | None = None,
) -> None:
    """Load a state dict without unpickling code, naming the model it fits when it doesn't fit.

    ``state_key``: the entry of the file that holds the state dict (SAM 2's ``model``).
    """
    state = load_weights(path, CONFIG_KEY, CheckpointError)
    if state_key is not None and isinstance(state, dict):
        state = state.get(state_key, state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is not a SAM state dict (a mapping of parameter names to tensors); "
            f"point {CONFIG_KEY} at one"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        guess = identify(state) if identify else None
        looks = f"it looks like {guess}" if guess else "its parameters do not match"
        first = str(error).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"checkpoint {path} does not fit sam={model_type} ({looks}: {detail}); "
            f"choose the matching sam model type or another {CONFIG_KEY}"
        ) from error
