"""Reading what an offline W&B run recorded, as `wandb sync` would upload it."""

from __future__ import annotations

import time
from pathlib import Path


def offline_record(folder: Path, *markers: bytes, timeout: float = 60.0) -> bytes:
    """The bytes of the one offline run log under ``folder``, once every marker is in it.

    W&B's writer is a separate process that may still be flushing when ``finish()``
    returns, so the log is read again until the markers arrive or ``timeout`` passes.
    """
    (log,) = folder.glob("**/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        record = log.read_bytes()
        if all(marker in record for marker in markers) or time.monotonic() > deadline:
            return record
        time.sleep(0.2)
