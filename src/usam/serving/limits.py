"""The bounds every request to the ML backend is held to, so that no request can take the
server down or hold it for long (``limits`` in ``conf/serve.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    request_bytes: int = 20_000_000  # a request body larger than this is answered 413
    # a /predict for more tasks than this, or still at work after predict_seconds (Label
    # Studio waits ML_TIMEOUT_PREDICT = 100 s), is answered with its first task's prediction
    # alone, upon which Label Studio asks for each task on its own
    max_tasks: int = 16
    predict_seconds: float = 90.0
    image_bytes: int = 50_000_000  # a task's image larger than this is refused (413)
    fetch_seconds: float = 30.0  # a task's image not fetched within this is refused (504)
    threads: int = 4  # requests served at once
    channel_timeout: int = 120  # seconds an idle connection is kept
    sam_cache: int = 256  # tasks whose SAM proposals are kept for fine-tuning without a rerun

    def check(self) -> None:
        for name in ("request_bytes", "max_tasks", "image_bytes", "threads", "channel_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.predict_seconds <= 0 or self.fetch_seconds <= 0:
            raise ValueError("predict_seconds and fetch_seconds must be positive")
        if self.sam_cache < 0:
            raise ValueError(f"sam_cache={self.sam_cache} must be >= 0")
