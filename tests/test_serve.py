"""``usam.serve``, the Label Studio ML backend, on the random tiny SAM and a random head: the
routes through Flask's test client (predictions against the Annotator's masks, decoded
with the Label Studio SDK; every bad request answered in JSON with the server still
serving), images Label Studio serves fetched with a legacy token or an exchanged personal
access token, annotations kept and replaced, a fine-tune after ``finetune_every`` of them that
changes what is served, and the real server in a process of its own, stopped by SIGTERM."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import jwt
import numpy as np
import pytest
import requests
from label_studio_sdk.converter import brush
from PIL import Image

from usam.cli import CONF_DIR
from usam.command_help import command_help
from usam.commands.serve import backend_of
from usam.core.config import ConfigError
from usam.core.errors import InputFileError
from usam.inference.annotator import Annotator
from usam.inference.label_studio import LOCAL_FILES, label_config, prediction_regions
from usam.inference.predictor import InferenceSettings, load_head
from usam.review.label_studio_tasks import review_of_tasks
from usam.serving.app import create_app, serve_in_thread
from usam.serving.backend import ResumeError
from usam.serving.errors import RequestError
from usam.serving.label_studio_token import MARGIN_SECONDS
from usam.serving.limits import Limits
from usam.serving.received import task_key
from usam.serving.task_images import TaskImages

from helpers.commands import TINY_MASKS, compose_config, wait_for
from helpers.evaluation import head_checkpoint
from helpers.reviews import drawn
from helpers.web_server import local_server, reply

SMALL = [*TINY_MASKS, "inference.confidence_threshold=0.3", "device=cpu"]
TOKEN = "serve-test-token"
SERVER_THREADS = ("usam-serve", "waitress")  # the names of its loop's and workers' threads


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A head, and images under ``images/`` as Label Studio's local files would hold them."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    for seed in (0, 1):
        Image.fromarray(drawn(seed)).save(images / f"drawn{seed}.png")
    noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "noise.png")  # ~43 kB: over limits.image_bytes
    (images / "broken.png").write_bytes(b"not an image")
    head_checkpoint(root / "head.ckpt")
    return root


def compose_serve(root: Path, out: Path, *extra: str):
    return compose_config(
        "serve",
        [
            f"paths.root_dir={root}",
            f"paths.output_dir={root / 'run'}",
            f"ckpt={root / 'head.ckpt'}",
            f"out={out}",
            f"document_root={root}",
            *SMALL,
            *extra,
        ],
    )


def task(task_id: int, name: str) -> dict:
    return {"id": task_id, "data": {"image": f"{LOCAL_FILES}images/{name}"}}


def predict(client, tasks: list[dict], config: str):
    return client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})


@pytest.fixture(scope="module")
def served(root):
    """A backend with tight limits, its Flask test client and its project's label config."""
    cfg = compose_serve(
        root,
        root / "out",
        "limits.max_tasks=2",
        "limits.request_bytes=300000",
        "limits.image_bytes=30000",
        "limits.fetch_seconds=1",
    )
    backend = backend_of(cfg)
    return backend, create_app(backend).test_client(), label_config(backend.classes, False)


def test_health_and_setup_name_the_head_and_its_random_weights(served):
    backend, client, config = served
    version = "usam head.ckpt + SAM tiny (random weights: not labels)"
    for path in ("/", "/health"):
        health = client.get(path)
        assert health.status_code == 200
        assert health.json == {
            "status": "UP",
            "model_class": "usam",
            "model_version": version,
            "finetuning": False,
            "annotations_pending": 0,
            "last_finetune_error": None,
        }
    setup = client.post("/setup", json={"project": "3.1700000000", "schema": config})
    assert setup.status_code == 200 and setup.json == {"model_version": version}


def brush_masks(result: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(label, mask) of each brush region, decoded as Label Studio decodes it."""
    found = []
    for region in result:
        if region["type"] == "brushlabels":
            shape = (region["original_height"], region["original_width"], 4)
            rgba = brush.decode_rle(region["value"]["rle"]).reshape(shape)
            found.append((region["value"]["brushlabels"][0], rgba[..., 3] == 255))
    return found


def test_predictions_are_the_annotators_regions_in_task_order(root, served):
    backend, client, config = served
    annotator = Annotator.from_checkpoint(
        root / "head.ckpt",
        amg=backend.annotator.amg,
        inference=InferenceSettings(confidence_threshold=0.3),
        device="cpu",
    )
    response = predict(client, [task(7, "drawn1.png"), task(3, "drawn0.png")], config)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 2
    for result, name in zip(results, ("drawn1.png", "drawn0.png")):
        expected = annotator(root / "images" / name)
        assert len(expected.labels) >= 2  # something to compare
        assert result["result"] == prediction_regions(expected, backend.classes, False)
        assert result["score"] == pytest.approx(1.0 - expected.uncertainty(), abs=1e-12)
        assert result["model_version"] == backend.current.model_version
        decoded = brush_masks(result["result"])
        assert [label for label, _ in decoded] == [backend.classes[i] for i in expected.labels]
        np.testing.assert_array_equal(np.stack([m for _, m in decoded]), expected.masks())


def test_regions_go_to_the_projects_own_tags_and_image_field(served):
    backend, client, _ = served
    labels = "".join(f'<Label value="{name}"/>' for name in backend.classes)
    config = (
        f'<View><Image name="photo" value="$picture"/>'
        f'<BrushLabels name="paint" toName="photo">{labels}</BrushLabels></View>'
    )
    entry = {"id": 3, "data": {"picture": task(3, "drawn0.png")["data"]["image"]}}
    result = predict(client, [entry], config).json["results"][0]["result"]
    assert result and {(r["from_name"], r["to_name"]) for r in result} == {("paint", "photo")}


def test_polygons_need_a_polygon_tag_and_come_as_the_export_writes_them(root):
    backend = backend_of(compose_serve(root, root / "polygons", "polygons=true"))
    client = create_app(backend).test_client()
    refused = predict(client, [task(3, "drawn0.png")], label_config(backend.classes, False))
    assert refused.status_code == 400
    assert "no <PolygonLabels>" in refused.json["error"]
    response = predict(client, [task(3, "drawn0.png")], label_config(backend.classes, True))
    annotator = Annotator(
        backend.annotator.predictor, backend.annotator.sam, amg=backend.annotator.amg
    )
    expected = annotator(root / "images" / "drawn0.png")
    assert response.json["results"][0]["result"] == prediction_regions(
        expected, backend.classes, True
    )
    assert {r["type"] for r in response.json["results"][0]["result"]} == {
        "brushlabels",
        "polygonlabels",
    }


def bad_requests(config: str, classes: list[str]) -> list[tuple[str, str, dict, int, str]]:
    """(method, path, request arguments, status, what the error says)."""
    unknown = config.replace(f'value="{classes[0]}"', 'value="unicorn"')
    return [
        ("post", "/predict", {"data": "tasks please"}, 400, "takes a JSON object"),
        ("post", "/predict", {"json": [1, 2]}, 400, "takes a JSON object"),
        ("post", "/predict", {"json": {"label_config": config}}, 400, "has no tasks"),
        ("post", "/predict", {"json": {"tasks": [], "label_config": config}}, 400, "no tasks"),
        ("post", "/predict", {"json": {"tasks": [task(1, "drawn0.png")]}}, 400, "no label config"),
        (
            "post",
            "/predict",
            {"json": {"tasks": [task(1, "drawn0.png")], "label_config": unknown}},
            400,
            f"labels the head was not trained on: unicorn; its labels must be the head's classes: "
            f"{', '.join(classes)}",
        ),
        ("post", "/setup", {"json": {"schema": unknown}}, 400, "not trained on: unicorn"),
        ("post", "/setup", {"json": {"schema": "<View"}}, 400, "is not XML"),
        (
            "post",
            "/setup",
            {"json": {"schema": '<View><Image name="i" value="$image"/></View>'}},
            400,
            "has no <BrushLabels>",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [{"data": {}}], "label_config": config}},
            400,
            "integer 'id'",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [{"id": 1, "data": {}}], "label_config": config}},
            400,
            "task 1 has no data.image",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [task(1, "missing.png")], "label_config": config}},
            404,
            "is not in document_root",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [task(1, "../../etc/passwd")], "label_config": config}},
            400,
            "is outside document_root",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [task(1, "broken.png")], "label_config": config}},
            422,
            "task 1's image /data/local-files/?d=images/broken.png is not an image file",
        ),
        (
            "post",
            "/predict",
            {"json": {"tasks": [task(1, "noise.png")], "label_config": config}},
            413,
            "larger than limits.image_bytes=30000",
        ),
        (
            "post",
            "/predict",
            {
                "json": {
                    "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                    "label_config": config,
                }
            },
            400,
            "served by Label Studio: set label_studio.url",
        ),
        ("post", "/predict", {"data": b"x" * 400_000}, 413, "Request Entity Too Large"),
        ("post", "/webhook", {"json": {"action": "ANNOTATION_CREATED"}}, 400, "needs the"),
        ("get", "/nowhere", {}, 404, "Not Found"),
        ("get", "/predict", {}, 405, "Method Not Allowed"),
    ]


def test_every_bad_request_gets_one_json_line_and_the_server_goes_on(served):
    backend, client, config = served
    good = predict(client, [task(3, "drawn0.png")], config)
    assert good.status_code == 200
    for method, path, arguments, status, says in bad_requests(config, backend.classes):
        response = getattr(client, method)(path, **arguments)
        assert (path, response.status_code) == (path, status), response.json
        assert list(response.json) == ["error"] and "\n" not in response.json["error"]
        assert says in response.json["error"], (path, response.json)
        assert predict(client, [task(3, "drawn0.png")], config).json == good.json


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _LabelStudioFiles(BaseHTTPRequestHandler):
    """Label Studio's /data/upload/: the image for the right token; /stall answers late."""

    def do_GET(self) -> None:
        if self.path.startswith("/stall"):
            time.sleep(3)
        elif self.headers.get("Authorization") != f"Token {TOKEN}":
            reply(self, 401, "text/plain", b"no token")
        else:
            reply(self, 200, "image/png", png(drawn(0)))

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("token", [TOKEN, "another"])
def test_images_on_the_label_studio_server_come_with_the_token_within_the_time(
    root, token, monkeypatch
):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    with local_server(_LabelStudioFiles) as url:
        extra = (f"label_studio.url={url}", "limits.fetch_seconds=1")
        backend = backend_of(compose_serve(root, root / "remote", *extra))
        client = create_app(backend).test_client()
        config = label_config(backend.classes, False)
        uploaded = predict(client, [{"id": 5, "data": {"image": "/data/upload/1/a.png"}}], config)
        if token != TOKEN:
            assert uploaded.status_code == 502
            assert uploaded.json["error"] == (
                "task 5's image /data/upload/1/a.png was refused by Label Studio (HTTP 401: "
                "Unauthorized): create a personal access token in Label Studio (Account & "
                "Settings) and set LABEL_STUDIO_API_KEY to it, or enable legacy tokens for the "
                "organization and set it to one"
            )
            return
        local = predict(client, [task(6, "drawn0.png")], config)
        assert uploaded.json["results"][0]["result"] == local.json["results"][0]["result"]
        whole = {"id": 7, "data": {"image": f"{url}/data/upload/1/a.png"}}  # with the token too
        assert predict(client, [whole], config).json["results"] == local.json["results"]
        started = time.monotonic()
        stalled = predict(client, [{"id": 8, "data": {"image": "/stall/a.png"}}], config)
        assert time.monotonic() - started < 2.5
        assert stalled.status_code == 504
        assert stalled.json["error"] == (
            "task 8's image /stall/a.png was not fetched within limits.fetch_seconds=1"
        )


SIGNING_KEY = "serve-test-signing-key-of-32-bytes"
LIFETIME = MARGIN_SECONDS + 2  # an access token usam keeps for 2 s
UPLOADED = {"id": 5, "data": {"image": "/data/upload/1/a.png"}}


def signed(kind: str, number: int) -> str:
    """A JWT as Label Studio signs them; ``number`` tells tokens of the same second apart."""
    now = int(time.time())
    claims = {"token_type": kind, "iat": now, "exp": now + int(LIFETIME), "jti": str(number)}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


PERSONAL = signed("refresh", 0)


class _PersonalTokens(BaseHTTPRequestHandler):
    """Label Studio 1.23 without legacy tokens: /api/token/refresh/ exchanges PERSONAL alone
    (and answers late under /stall, in HTML under /html); /data/upload/ wants the access
    token issued last. Records what it issued and the Authorization headers it saw."""

    issued: list[str] = []
    seen: list[str | None] = []

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.startswith("/stall"):
            time.sleep(3)
        elif self.path.startswith("/html"):
            reply(self, 200, "text/html", b"<html>a login page</html>")
        elif asked != {"refresh": PERSONAL}:
            reply(self, 401, "application/json", b'{"detail": "Token is invalid"}')
        else:
            self.issued.append(signed("access", len(self.issued) + 1))
            reply(self, 200, "application/json", json.dumps({"access": self.issued[-1]}).encode())

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        if self.issued and self.seen[-1] == f"Bearer {self.issued[-1]}":
            reply(self, 200, "image/png", png(drawn(0)))
        else:
            reply(self, 401, "application/json", b'{"detail": "Invalid token."}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def personal_tokens() -> Iterator[str]:
    _PersonalTokens.issued, _PersonalTokens.seen = [], []
    with local_server(_PersonalTokens) as url:
        yield url


def test_a_personal_access_token_is_exchanged_once_until_shortly_before_it_expires(
    personal_tokens,
):
    images = TaskImages(None, personal_tokens, PERSONAL, Limits(fetch_seconds=1))
    for _ in range(2):
        np.testing.assert_array_equal(images(UPLOADED, "image"), drawn(0))
    issued, seen = _PersonalTokens.issued, _PersonalTokens.seen
    assert seen == [f"Bearer {issued[0]}"] * 2 and len(issued) == 1
    time.sleep(LIFETIME - MARGIN_SECONDS + 0.1)
    np.testing.assert_array_equal(images(UPLOADED, "image"), drawn(0))
    assert len(issued) == 2 and seen[-1] == f"Bearer {issued[1]}"


@pytest.mark.parametrize(
    "token, under, status, message",
    [
        (
            signed("refresh", 1),
            "",
            502,
            "Label Studio refused the personal access token in LABEL_STUDIO_API_KEY at "
            "{url}/api/token/refresh/ (HTTP 401: Token is invalid): create a personal access "
            "token in Label Studio (Account & Settings) and set LABEL_STUDIO_API_KEY to it",
        ),
        (
            PERSONAL,
            "/html",
            502,
            "{url}/api/token/refresh/ answered no access token for LABEL_STUDIO_API_KEY "
            "(JSONDecodeError: Expecting value: line 1 column 1 (char 0)); check that "
            "label_studio.url is Label Studio",
        ),
        (
            PERSONAL,
            "/stall",
            504,
            "task 5's image /data/upload/1/a.png was not fetched within limits.fetch_seconds=1",
        ),
        (
            "legacy-token",
            "",
            502,
            "task 5's image /data/upload/1/a.png was refused by Label Studio (HTTP 401: Invalid "
            "token.): create a personal access token in Label Studio (Account & Settings) and "
            "set LABEL_STUDIO_API_KEY to it, or enable legacy tokens for the organization and "
            "set it to one",
        ),
    ],
    ids=["refused", "not-label-studio", "stalled", "legacy"],
)
def test_a_token_label_studio_does_not_take_is_one_line_saying_what_to_do(
    personal_tokens, token, under, status, message
):
    url = personal_tokens + under
    images = TaskImages(None, url, token, Limits(fetch_seconds=1))
    started = time.monotonic()
    with pytest.raises(RequestError) as refused:
        images(UPLOADED, "image")
    assert time.monotonic() - started < 2.5
    assert (str(refused.value), refused.value.status) == (message.format(url=url), status)
    assert _PersonalTokens.issued == []


@pytest.mark.parametrize("limit", ["limits.max_tasks=2", "limits.predict_seconds=1e-9"])
def test_a_predict_it_cannot_answer_whole_gets_its_first_task_alone(root, served, limit):
    """Label Studio then asks for each task on its own: one result for several tasks is its
    sign that a backend predicts one task at a time."""
    _, test_client, config = served
    backend = backend_of(compose_serve(root, root / "partial", limit))
    client = create_app(backend).test_client()
    tasks = [task(1, "drawn0.png"), task(2, "drawn1.png"), task(3, "drawn0.png")]
    response = predict(client, tasks, config)
    assert response.status_code == 200
    assert response.json["results"] == predict(test_client, tasks[:1], config).json["results"]
    done = 2 if limit == "limits.max_tasks=2" else 1
    seconds = "1e-09" if done == 1 else "90"
    assert response.json["note"] == (
        f"{done} of 3 tasks predicted within limits.max_tasks={16 if done == 1 else 2} and "
        f"limits.predict_seconds={seconds}: the first task's prediction alone is returned, "
        "ask for the others one at a time"
    )
    whole = predict(client, tasks[:1], config).json
    assert "note" not in whole and len(whole["results"]) == 1


def submitted(task_id: int, name: str, regions: list[dict], action: str, config: str) -> dict:
    """What Label Studio's webhook posts when a person submits an annotation."""
    annotation = {"id": 100 + task_id, "task": task_id, "result": regions, "was_cancelled": False}
    project = {"id": 1, "title": "review", "label_config": config}
    return {"action": action, "annotation": annotation, "task": task(task_id, name)} | {
        "project": project
    }


def relabelled(regions: list[dict], name: str) -> list[dict]:
    """The regions as a reviewer submits them after giving every one the class ``name``."""
    corrected = []
    for region in regions:
        value = {**region["value"], "brushlabels": [name]}
        kept = {k: v for k, v in region.items() if k != "score"}
        corrected.append(kept | {"value": value, "origin": "prediction-changed"})
    return corrected


def test_the_webhook_keeps_each_tasks_latest_annotation_across_restarts(root, served):
    _, _, config = served
    out = root / "kept"
    cfg = compose_serve(root, out)
    backend = backend_of(cfg)
    client = create_app(backend).test_client()
    regions = predict(client, [task(3, "drawn0.png")], config).json["results"][0]["result"]
    first = client.post(
        "/webhook", json=submitted(3, "drawn0.png", regions, "ANNOTATION_CREATED", config)
    )
    assert first.status_code == 200
    assert first.json == {"status": "stored", "task": 3, "received": 1, "finetune": False}
    corrected = relabelled(regions[:1], "cat")
    again = submitted(3, "drawn0.png", corrected, "ANNOTATION_UPDATED", config)
    assert client.post("/webhook", json=again).json["received"] == 2
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert ignored.status_code == 200
    assert ignored.json == {"status": "ignored", "action": "PROJECT_UPDATED"}
    stored = sorted((out / "annotations").iterdir())
    assert [path.name for path in stored] == ["task-3.json"]
    entry = json.loads(stored[0].read_text())
    assert entry["received"] == 2 and entry["image_field"] == "image"
    assert entry["task"]["annotations"][0]["result"] == corrected
    restarted = create_app(backend_of(cfg)).test_client()
    assert restarted.get("/health").json["annotations_pending"] == 1
    later = restarted.post(
        "/webhook", json=submitted(4, "drawn1.png", regions, "ANNOTATION_CREATED", config)
    )
    assert later.json["received"] == 3


def test_a_finetune_after_finetune_every_annotations_changes_what_is_served(root, served):
    """Every region of two images relabelled ``cat``, which the random head never predicts,
    and a third annotation whose image is gone: the fine-tuned head predicts ``cat`` for
    each region, its metadata records the two images and the one left out, and a restart
    serves it again."""
    _, _, config = served
    out = root / "tuned"
    cfg = compose_serve(root, out, "finetune_every=3", "finetune.lr=0.01", "finetune.max_epochs=30")
    backend = backend_of(cfg)
    client = create_app(backend).test_client()
    tasks = [task(1, "drawn0.png"), task(2, "drawn1.png")]
    before = predict(client, tasks, config).json["results"]
    assert {r["value"]["brushlabels"][0] for b in before for r in b["result"]} == {"boat"}
    corrected = [relabelled(result["result"], "cat") for result in before]
    bodies = [
        submitted(1, "drawn0.png", corrected[0], "ANNOTATION_CREATED", config),
        submitted(9, "gone.png", corrected[0], "ANNOTATION_CREATED", config),
        submitted(2, "drawn1.png", corrected[1], "ANNOTATION_CREATED", config),
    ]
    started = [client.post("/webhook", json=body).json["finetune"] for body in bodies]
    assert started == [False, False, True]
    wait_for(lambda: not backend.finetuning, "the end of the fine-tune", seconds=300)
    version = "usam head.ckpt fine-tune 1 + SAM tiny (random weights: not labels)"
    health = client.get("/health").json
    assert (health["model_version"], health["last_finetune_error"]) == (version, None)
    assert health["annotations_pending"] == 0
    after = predict(client, tasks, config).json["results"]
    assert [a["model_version"] for a in after] == [version, version]
    assert all(a["result"] for a in after)
    assert [[r["value"]["brushlabels"][0] for r in a["result"]] for a in after] == [
        ["cat"] * len(a["result"]) for a in after
    ]
    pointer = json.loads((out / "current.json").read_text())
    assert pointer == {
        "base": str((root / "head.ckpt").resolve()),
        "ckpt": "finetunes/1/finetune.ckpt",
        "generation": 1,
        "through": 3,
    }
    source = str(out / "annotations")
    reviewed = [body["task"] | {"annotations": [body["annotation"]]} for body in bodies]
    digest = review_of_tasks([reviewed[0], reviewed[2]], backend.classes, source, task_key)
    metadata = load_head(out / pointer["ckpt"]).metadata
    assert metadata.stage == "FineTuneModule"
    assert metadata.review == {
        "source": source,
        "sha256": digest.digest(),
        "images": 2,
        "regions": sum(len(b["result"]) for b in before),
        "skipped": 1,
    }
    restarted = create_app(backend_of(cfg)).test_client()
    assert restarted.get("/health").json["model_version"] == version
    assert predict(restarted, tasks, config).json["results"] == after


def test_settings_the_backend_cannot_honour_stop_it_before_it_serves(root):
    with pytest.raises(ConfigError, match=r"finetune.mil_weight=0.5: the backend fine-tunes"):
        backend_of(compose_serve(root, root / "mil", "finetune.mil_weight=0.5"))
    with pytest.raises(ConfigError, match=r"finetune_every=0: give at least 1"):
        backend_of(compose_serve(root, root / "never", "finetune_every=0"))
    with pytest.raises(ConfigError, match=r"^limits: max_tasks=0 must be at least 1$"):
        backend_of(compose_serve(root, root / "never", "limits.max_tasks=0"))
    with pytest.raises(InputFileError, match=r"^document_root=.*nowhere is not a folder; set it"):
        backend_of(compose_serve(root, root / "never", f"document_root={root / 'nowhere'}"))


def test_an_out_folder_resumes_only_the_head_it_fine_tuned(root):
    out = root / "pointer"
    out.mkdir()
    other = str(root / "other.ckpt")
    (out / "current.json").write_text(json.dumps({"base": other, "ckpt": "x", "generation": 1}))
    with pytest.raises(ResumeError, match=rf"holds fine-tunes of {other}, not of .*head.ckpt"):
        backend_of(compose_serve(root, out))


def test_the_command_serves_over_http_until_sigterm(root, served):
    """The real server: over HTTP, a body over the limit is refused (in JSON up to waitress's
    own cut-off) and the next request still served; SIGTERM ends it with 128 + 15."""
    _, test_client, config = served
    command = [
        sys.executable,
        *("-m", "usam.serve", f"ckpt={root / 'head.ckpt'}", f"out={root / 'process'}"),
        *("port=0", "limits.request_bytes=100000", f"document_root={root}"),
        *(f"paths.root_dir={root}", f"paths.output_dir={root / 'process-run'}", *SMALL),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    errors = root / "serve.stderr"
    with errors.open("w") as stderr:
        server = subprocess.Popen(
            command, cwd=root, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            found = re.search(r" at (http://127\.0\.0\.1:\d+) \(paste it into Label Studio", line)
            if found:
                break
        assert found, "".join(lines) + errors.read_text()
        url = found[1]
        assert "(random weights: not labels)" in line and "RANDOM WEIGHTS" in line
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "UP"
        body = {"tasks": [task(3, "drawn0.png")], "label_config": config, "project": "1.1"}
        expected = predict(test_client, body["tasks"], config).json
        refused = requests.post(f"{url}/predict", data=b"x" * 200_000, timeout=30)
        assert refused.status_code == 413
        assert refused.json()["error"].startswith("Request Entity Too Large: ")
        assert requests.post(f"{url}/predict", json=body, timeout=60).json() == expected
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            announced = "POST /predict HTTP/1.1\r\nHost: usam\r\nContent-Length: 3000000\r\n\r\n"
            connection.sendall(announced.encode())  # waitress refuses it before any body
            assert connection.recv(4096).startswith(b"HTTP/1.1 413 Request Entity Too Large")
        assert requests.post(f"{url}/predict", json=body, timeout=60).json() == expected
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 128 + signal.SIGTERM
        assert "usam.serve: stopped by SIGTERM" in errors.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_help_names_the_required_keys_first_and_every_option():
    shown = command_help("serve", CONF_DIR)
    required = shown.split("\n\n")[1].splitlines()
    assert required[0] == "required:"
    assert [line.split("=")[0].strip() for line in required[1:]] == ["ckpt", "out"]
    for key in ("host", "port", "finetune_every", "finetune", "polygons", "document_root"):
        assert f"\n  {key}=" in shown, key
    assert re.search(r"\n  label_studio=\{\.\.\.\} +url: the Label Studio that serves", shown)
    assert "\n  limits={...}" in shown and "\nsam=tiny  (one of:" in shown


def test_a_backend_served_from_a_thread_answers_until_closed(served):
    """Closing ends the server's threads even with a connection kept alive."""
    backend, _, _ = served
    server = serve_in_thread(backend)
    with requests.Session() as kept_alive:
        health = kept_alive.get(f"{server.url}/health", timeout=10).json()
        assert health["model_version"] == backend.current.model_version
        server.close()
        left = [t.name for t in threading.enumerate() if t.name.startswith(SERVER_THREADS)]
        assert left == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/health", timeout=5)
