"""Serve a trained head to Label Studio as an ML backend: ``python -m usam.serve
ckpt=HEAD.ckpt out=DIR sam=vit_h``.

SAM is built before the server listens, so the first prediction is not slowed by it and a
head given the wrong SAM fails at once. The line printed once the server listens holds the
URL to paste into Label Studio. SIGINT or SIGTERM stop it between requests, with exit code
128 + the signal (``usam.core.stopping``'s convention); everything received is already on
disk, so the same command resumes, from the newest fine-tuned head.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from usam.commands.annotate import provenance_of
from usam.commands.mask_settings import configured_annotator
from usam.core.config import ConfigError, settings_from_config
from usam.core.provenance import report
from usam.core.stopping import STOP_SIGNALS, Stopped
from usam.review.finetune import FineTuneSettings
from usam.serving.app import Server, create_app
from usam.serving.backend import Backend, BackendSettings
from usam.serving.limits import Limits
from usam.serving.task_images import TaskImages

NOT_LABELS = "its predictions only exercise the pipeline; they are NOT labels"
TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"


def _finetune_settings(cfg: DictConfig) -> FineTuneSettings:
    if cfg.finetune_every < 1:
        raise ConfigError(f"finetune_every={cfg.finetune_every}: give at least 1")
    settings = settings_from_config(FineTuneSettings, cfg.finetune, "finetune")
    if settings.mil_weight:
        raise ConfigError(
            f"finetune.mil_weight={settings.mil_weight}: the backend fine-tunes on reviewed "
            "masks alone; set it to 0 (python -m usam.fit stage=finetune adds the MIL loss)"
        )
    return settings


def backend_of(cfg: DictConfig) -> Backend:
    """The backend ``cfg`` describes, its SAM built."""
    finetune = _finetune_settings(cfg)
    limits = settings_from_config(Limits, cfg.limits, "limits")
    annotator = configured_annotator(cfg)
    token = os.environ.get(TOKEN_VARIABLE)
    images = TaskImages(cfg.document_root, cfg.label_studio.url, token, limits)
    settings = BackendSettings(Path(cfg.out), cfg.finetune_every, cfg.polygons)
    backend = Backend(annotator, settings, finetune, images, limits, provenance_of(annotator))
    annotator.engine  # noqa: B018 (SAM built now, not at the first request)
    return backend


@contextlib.contextmanager
def _stopping_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM end the server's loop (waitress ends it on a ``SystemExit`` and
    closes its threads); yields the signals received."""
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(cfg: DictConfig) -> None:
    """Serves until a signal stops it."""
    backend = backend_of(cfg)
    server = Server(create_app(backend), cfg.host, cfg.port, backend.limits)
    report(backend.provenance, NOT_LABELS)
    print(
        f"usam.serve: {backend.current.model_version} at {server.url} (paste it into Label "
        f"Studio: project Settings > Model > Connect Model){backend.provenance.note()}",
        flush=True,
    )
    backend.start_finetune_when_due()
    with _stopping_signals() as received:
        server.run()
    signum = received[0]
    print(
        f"usam.serve: stopped by {signal.Signals(signum).name}; what it received is in "
        f"{backend.settings.out}, from which the same command resumes",
        file=sys.stderr,
        flush=True,
    )
    raise Stopped(signum)
