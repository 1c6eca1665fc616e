"""How a request to the ML backend fails: one line for Label Studio, with an HTTP status."""

from __future__ import annotations

from usam.core.errors import UsageError


class RequestError(UsageError, ValueError):
    """A request the backend refuses or cannot answer; the server goes on serving."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
