"""The HTTP side of the ML backend: the routes Label Studio calls (its
``ml/api_connector.py``), on Flask, served by waitress.

``GET /`` and ``/health``, ``POST /setup``, ``/predict`` and ``/webhook``. Every refusal is
JSON ``{"error": "<one line>"}`` with its status (400 a bad request, 404 no such route or
image, 413 too large, 422 no image, 502/504 an image that cannot be fetched); anything
else a request meets is logged with its traceback and answered 500, and the server goes
on serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from flask import Flask, jsonify, request
from waitress import create_server
from werkzeug.exceptions import HTTPException

from usam.serving.backend import Backend
from usam.serving.errors import RequestError
from usam.serving.limits import Limits

log = logging.getLogger(__name__)
# waitress cuts off a body this much over the limit itself, in plain text; up to there
# Flask answers 413 in JSON
WAITRESS_MARGIN_BYTES = 1 << 20


def _payload() -> Mapping[str, Any]:
    request.get_data(cache=True)  # a body over MAX_CONTENT_LENGTH is a 413 here
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise RequestError(f"POST {request.path} takes a JSON object as its body")
    return payload


def create_app(backend: Backend) -> Flask:
    app = Flask("usam.serve")
    app.config["MAX_CONTENT_LENGTH"] = backend.limits.request_bytes

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(backend.health())

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(_payload()))

    @app.post("/predict")
    def predict():
        return jsonify(backend.predict(_payload()))

    @app.post("/webhook")
    def webhook():
        return jsonify(backend.webhook(_payload()))

    @app.errorhandler(RequestError)
    def refused(error: RequestError):
        log.warning("%s %s: %s", request.method, request.path, error)
        return jsonify(error=" ".join(str(error).split())), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=f"{error.name}: {error.description}"), error.code

    @app.errorhandler(Exception)
    def bug(error: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"{type(error).__name__}: {error}".splitlines()[0]), 500

    return app


class Server:
    """The app on ``host:port`` (port 0: a free one), listening once made. :meth:`run`
    serves in the calling thread until a signal's exception there (the command);
    :meth:`start` serves from a thread of its own until :meth:`close`."""

    def __init__(self, app: Flask, host: str, port: int, limits: Limits) -> None:
        self._sockets: dict[int, Any] = {}  # waitress's: the listening one and every connection
        self._server = create_server(
            app,
            map=self._sockets,
            host=host,
            port=port,
            threads=limits.threads,
            channel_timeout=limits.channel_timeout,
            max_request_body_size=limits.request_bytes + WAITRESS_MARGIN_BYTES,
            ident="usam",
        )
        self.host, self.port = host, self._server.effective_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        self._server.run()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.run, name="usam-serve", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Ends :meth:`start`'s thread: its loop closes every socket itself (a connection
        kept alive would keep it serving), then the workers finish what they answer."""
        self._server.trigger.pull_trigger(self._close_sockets)
        if self._thread is not None:
            self._thread.join()
        self._server.task_dispatcher.shutdown()

    def _close_sockets(self) -> None:
        for channel in list(self._sockets.values()):
            channel.close()


def serve_in_thread(backend: Backend, host: str = "127.0.0.1", port: int = 0) -> Server:
    """The backend served from a thread, answering once this returns (tests, and anything
    that embeds the backend); ``close()`` stops it."""
    return Server(create_app(backend), host, port, backend.limits).start()
