"""The ``Authorization`` header for Label Studio's own files, from ``LABEL_STUDIO_API_KEY``.

Label Studio hands out two kinds of token. A personal access token (a JWT refresh token; the
only kind Label Studio 1.23 enables by default) is exchanged at ``POST /api/token/refresh/``
for a short-lived access token (five minutes), sent as ``Bearer``; a legacy token is sent as
``Token`` itself. The Label Studio SDK makes the same exchange, but only inside its client
(``label_studio_sdk.tokens.client_ext``, not exported) for the requests that client sends,
and its public ``tokens.refresh`` goes through a client that exchanges the key again before
every call; so the one POST is made here, with urllib as the image is fetched, and its access
token is kept until ``MARGIN_SECONDS`` before its end. Its lifetime is read as ``exp - iat``
and counted on this machine's clock, so a server whose clock differs does not shorten it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import jwt

from usam.serving.errors import RequestError

REFRESH = "/api/token/refresh/"
MARGIN_SECONDS = 30.0  # an access token is exchanged again this long before it expires
NEW_TOKEN = (
    "create a personal access token in Label Studio (Account & Settings) and set "
    "LABEL_STUDIO_API_KEY to it"
)


def is_personal_access_token(token: str) -> bool:
    """A JWT (header and claims readable, the signature only Label Studio can check); a
    legacy token is a plain hex string."""
    try:
        jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return False
    return True


def answer_of(error: urllib.error.HTTPError) -> str:
    """``HTTP 401: <Label Studio's detail>`` on one line, or the status's reason."""
    try:
        body = json.loads(error.read(4096))
    except (OSError, ValueError):
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    reason = detail if isinstance(detail, str) else error.reason
    return f"HTTP {error.code}: {' '.join(str(reason).split())}"


def refused(what: str, error: urllib.error.HTTPError) -> RequestError:
    """Label Studio's 401 or 403 for ``what``, fetched with LABEL_STUDIO_API_KEY (or none)."""
    return RequestError(
        f"{what} was refused by Label Studio ({answer_of(error)}): {NEW_TOKEN}, or enable "
        "legacy tokens for the organization and set it to one",
        502,
    )


class LabelStudioToken:
    """``LABEL_STUDIO_API_KEY`` as the ``Authorization`` header Label Studio accepts now."""

    def __init__(self, label_studio_url: str, token: str, fetch_seconds: float) -> None:
        self.refresh_url = label_studio_url + REFRESH
        self.token = token
        self.fetch_seconds = fetch_seconds
        self.personal = is_personal_access_token(token)
        self._lock = threading.Lock()
        self._access = ""
        self._fresh_until = 0.0  # time.monotonic()

    def authorization(self) -> str:
        if not self.personal:
            return f"Token {self.token}"
        with self._lock:  # one exchange for the requests that need it at once
            if time.monotonic() >= self._fresh_until:
                started = time.monotonic()
                self._access, lifetime = self._exchange()
                self._fresh_until = started + lifetime - MARGIN_SECONDS
            return f"Bearer {self._access}"

    def _exchange(self) -> tuple[str, float]:
        """A new access token and its lifetime in seconds."""
        request = urllib.request.Request(
            self.refresh_url,
            data=json.dumps({"refresh": self.token}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.fetch_seconds) as response:
                access = json.loads(response.read())["access"]
            claims = jwt.decode(access, options={"verify_signature": False})
            return access, float(claims["exp"] - claims["iat"])
        except urllib.error.HTTPError as error:
            raise RequestError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY at "
                f"{self.refresh_url} ({answer_of(error)}): {NEW_TOKEN}",
                502,
            ) from None
        except (ValueError, TypeError, KeyError, jwt.InvalidTokenError) as error:
            raise RequestError(
                f"{self.refresh_url} answered no access token for LABEL_STUDIO_API_KEY "
                f"({type(error).__name__}: {error}); check that label_studio.url is Label Studio",
                502,
            ) from None
