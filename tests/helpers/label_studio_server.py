"""A real Label Studio on the loopback address, and the start, wait and stop of every server
process a test runs beside it, whose log is printed when the test fails.

Label Studio (Django and its pins) lives in an environment of its own (``pip install
label-studio``), found as the ``label-studio`` executable on PATH; the tests that need it are
skipped without one. The SDK side runs in this environment, where the ``review`` extra installs
the Label Studio SDK beside usam.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from label_studio_sdk.client import LabelStudio

LABEL_STUDIO = shutil.which("label-studio")
TOKEN = "usam-review-test-token"
needs_label_studio = pytest.mark.skipif(
    LABEL_STUDIO is None, reason="no label-studio executable on PATH"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(
    command: Sequence[str], env: dict[str, str], log: Path, health: str, seconds: float
) -> Iterator[None]:
    """Runs ``command`` for the block, entered once GET ``health`` answers; stops it after
    (killed if it ignores SIGTERM for 30 s), and prints the tail of its log when the block
    raises, so pytest shows it beside the failure."""
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + seconds
            while True:
                assert process.poll() is None, f"{command[0]} exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{health} did not answer in {seconds:.0f} s"
                try:
                    if requests.get(health, timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(1)
            yield
        except BaseException:
            print(f"--- the last lines of {log.name} ---\n{log.read_text()[-6000:]}")
            raise
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    document_root: Path  # the folder its /data/local-files/ serves (after a storage connects it)

    def client(self) -> LabelStudio:
        return LabelStudio(base_url=self.url, api_key=TOKEN)


@contextmanager
def label_studio(folder: Path) -> Iterator[LabelStudioServer]:
    """A fresh Label Studio with its data in ``folder / 'label-studio'``, serving local files
    from ``folder / 'served'``, and letting its projects call ML backends and their webhooks on
    the loopback address (by default refused as private addresses)."""
    root, data = folder / "served", folder / "label-studio"
    root.mkdir()
    port = free_port()
    env = os.environ | {
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        # a loaded test machine may answer slower than the 1 s and 3 s an idle one is given
        "ML_TIMEOUT_HEALTH": "20",
        "ML_TIMEOUT_SETUP": "30",
        "WEBHOOK_TIMEOUT": "20",
    }
    command = [
        LABEL_STUDIO, "start", "--no-browser", "--internal-host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(data), "--username", "reviewer@example.com",
        "--password", "usam-review-1", "--user-token", TOKEN, "--enable-legacy-api-token",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # the first start migrates its database
    with serving(command, env, folder / "label-studio.log", f"{url}/health", 600):
        yield LabelStudioServer(url, root)
