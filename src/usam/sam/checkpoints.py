"""Finding, downloading and loading SAM checkpoints, with errors that say what to do.

Resolution order: an explicit path, else ``$USAM_CACHE/checkpoints/<file>`` (default
``~/.cache/usam``), else a download with a progress bar and a SHA-256 check. A
download is written to a temporary file and renamed only once complete and verified,
so an interrupted or corrupt download never looks like a checkpoint. With
``USAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded: a missing checkpoint
fails at once instead of waiting on a network that is not there.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from usam.core.errors import UsageError
from usam.core.weights import load_weights

CONFIG_KEY = "sam.checkpoint"
_CHUNK = 1 << 20


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that is missing, cannot be fetched, is corrupt or belongs to another model."""


def cache_dir() -> Path:
    return Path(os.environ.get("USAM_CACHE") or Path.home() / ".cache" / "usam") / "checkpoints"


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("USAM_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(name: str, url: str | None, why: str) -> CheckpointError:
    source = f"download it from {url} and " if url else ""
    return CheckpointError(
        f"SAM checkpoint {name} is not available ({why}): {source}"
        f"set {CONFIG_KEY}=/path/to/{name}, or place it in {cache_dir()}"
    )


def download(url: str, dest: str | Path, sha256: str | None, *, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; verify it when ``sha256`` is known."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (
                TextColumn(f"downloading {dest.name}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task("download", total=total)
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    progress.update(task, advance=len(block))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CheckpointError(
                f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
                f"the file was discarded. Retry, or fetch it yourself and set "
                f"{CONFIG_KEY}=/path/to/{dest.name}"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as error:
        raise _missing(dest.name, url, f"download failed: {error}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve(
    name: str,
    url: str | None,
    sha256: str | None,
    *,
    explicit: str | Path | None = None,
) -> Path:
    """Path of checkpoint ``name``: the explicit one, the cached one, or a fresh download."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"SAM checkpoint {path} does not exist; fix {CONFIG_KEY} "
                f"(or leave it unset to use the official checkpoint)"
            )
        return path
    cached = cache_dir() / name
    if cached.is_file():
        return cached
    if url is None:
        raise _missing(name, None, "no download address is known for it")
    if offline():
        raise _missing(name, url, "offline: USAM_OFFLINE or HF_HUB_OFFLINE is set")
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
