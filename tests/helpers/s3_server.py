"""A real S3 API on the loopback address (moto's server mode) for the object-storage tests:
s3fs talks HTTP to it exactly as it would to a cloud endpoint."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# what a user sets for a custom endpoint (docs/shards.md): the standard AWS variables
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 that stops when the block ends; yields the environment
    that points s3fs (in this process and in child processes) at it."""
    server_module = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    pytest.importorskip("s3fs", reason="pip install 'usam[cloud]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


def s3_filesystem(environment: dict[str, str]):
    """A fresh s3fs client of the server (no cached listings), for the test's own looks."""
    import s3fs

    return s3fs.S3FileSystem(
        key=environment["AWS_ACCESS_KEY_ID"],
        secret=environment["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=environment["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def with_environment(environment: dict[str, str]) -> dict[str, str]:
    """This process's environment plus ``environment``, for a child process."""
    return {**os.environ, **environment, "OMP_NUM_THREADS": "1"}
