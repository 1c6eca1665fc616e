"""The review loop against a real Label Studio: usam's ML backend (``python -m usam.serve``,
random tiny SAM, random head over three classes) connected through the Label Studio SDK
predicts the imported tasks, a reviewer's corrected annotations come back to it, it
fine-tunes in the background, and the next predictions are the fine-tuned head's and
carry the corrected class. The project is then read back as a review
(``read_review("<server>/projects/<id>")``) and ``usam.fit stage=finetune`` learns from it.

Everything after the start holds a personal access token, with legacy tokens disabled as
Label Studio 1.23 disables them by default: the backend exchanges it for the image one task
has as an upload (``/data/upload/...``, fetched from ``label_studio.url``), the others being
local files it reads from ``document_root``.

Only Label Studio's own calls are used, as its ``ml`` and ``webhooks`` apps make them:

* connecting: ``ml.create(url=..., project=...)``; Label Studio checks ``/health``, posts
  the project's label config to ``/setup`` (whose answer is the ``model_version``) and
  registers ``<url>/webhook`` as a webhook for every action of the project.
* predictions: the data manager action ``retrieve_tasks_predictions`` over all tasks;
  Label Studio asks ``/setup`` for the current ``model_version`` and posts to ``/predict``
  the tasks without a prediction of that version, so after a fine-tune the same action
  fetches the new head's predictions beside the old.
* corrections: ``annotations.create``, whose ``ANNOTATION_CREATED`` webhook posts the
  annotation with its task and project (and label config) to ``/webhook``: the backend keeps
  each one and counts them to ``finetune_every`` itself. Not the project's "start training
  on annotation submission" flag: that calls ``/api/ml/{id}/train``, which posts either to a
  ``/train`` route the backend does not have or a bare ``START_TRAINING`` webhook without
  the annotation.

Label Studio refuses ML backends and webhooks on the loopback address unless told otherwise
(``helpers.label_studio_server`` does). Skipped unless a ``label-studio`` executable is on
PATH.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import requests
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.converter import brush
from label_studio_sdk.types import Prediction as StoredPrediction
from PIL import Image

from usam.core.config import settings_from_config
from usam.inference.annotator import Annotator
from usam.inference.label_studio import LOCAL_FILES, label_config
from usam.inference.predictor import InferenceSettings, Prediction, Predictor, load_head
from usam.review.read import read_review
from usam.review.reviewed import ReviewError
from usam.sam.amg_settings import AmgSettings

from helpers.commands import TINY_EXTRACT, TINY_MASKS, compose_config, run_entry
from helpers.evaluation import head_checkpoint
from helpers.label_studio_server import (
    TOKEN,
    LabelStudioServer,
    free_port,
    label_studio,
    needs_label_studio,
    serving,
)
from helpers.reviews import drawn

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_label_studio]

CLASSES = ["cat", "dog", "car"]
SERVE = [
    *TINY_MASKS,
    "inference.confidence_threshold=0.3",
    "device=cpu",
    "finetune_every=2",
    # a higher rate than the default, so that two reviewed images move the head in few steps
    "finetune.lr=0.01",
    "finetune.max_epochs=30",
]
NAMES = [f"photo{seed}.png" for seed in range(4)]
CORRECTED = NAMES[:2]  # finetune_every of them
UPLOADED = NAMES[-1]  # imported as a file upload, the others as local files
FIRST = "usam head.ckpt + SAM tiny (random weights: not labels)"
TUNED = "usam head.ckpt fine-tune 1 + SAM tiny (random weights: not labels)"


def brush_regions(result: list[dict]) -> tuple[list[str], np.ndarray]:
    """Labels and masks of the brush regions, decoded as Label Studio decodes them."""
    labels, masks = [], []
    for region in result:
        assert region["type"] == "brushlabels"
        shape = (region["original_height"], region["original_width"], 4)
        masks.append(brush.decode_rle(region["value"]["rle"]).reshape(shape)[..., 3] == 255)
        labels.append(region["value"]["brushlabels"][0])
    return labels, np.stack(masks)


def assert_is(prediction: StoredPrediction, expected: Prediction) -> None:
    labels, masks = brush_regions(prediction.result)
    assert labels == [CLASSES[label] for label in expected.labels]
    np.testing.assert_array_equal(masks, expected.masks())
    assert prediction.score == pytest.approx(1.0 - expected.uncertainty(), abs=1e-9)


def photo_name(image: str) -> str:
    """``photoN.png`` of a task's ``data.image``: a local file ``photos/photoN.png``, or an
    upload, which Label Studio names ``/data/upload/<project>/<8 hex digits>-photoN.png``."""
    return re.search(r"photo\d+\.png$", image)[0]


def reviewed_name(image: str) -> str:
    """The image's name in a review: its path under the local files' folder, or the upload's
    file name."""
    return (
        image.removeprefix(LOCAL_FILES)
        if image.startswith(LOCAL_FILES)
        else PurePosixPath(image).name
    )


def upload(server: LabelStudioServer, access: str, project: int, path: Path) -> None:
    """Imports ``path`` as an upload, as Label Studio's import dialog sends it."""
    with path.open("rb") as image:
        answer = requests.post(
            f"{server.url}/api/projects/{project}/import",
            headers={"Authorization": f"Bearer {access}"},
            files={path.name: (path.name, image, "image/png")},
            timeout=60,
        )
    assert answer.status_code == 201, answer.text


def predictions_of(client: LabelStudio, project: int, version: str) -> dict[str, StoredPrediction]:
    """File name -> the task's one prediction of ``version``."""
    found: dict[str, StoredPrediction] = {}
    names = {task.id: photo_name(task.data["image"]) for task in client.tasks.list(project=project)}
    for prediction in client.predictions.list(project=project):
        if prediction.model_version == version:
            assert names[prediction.task] not in found, "two predictions of one version"
            found[names[prediction.task]] = prediction
    return found


def retrieve_predictions(
    client: LabelStudio, project: int, version: str
) -> dict[str, StoredPrediction]:
    """The predictions of ``version`` after the data manager asked the backend for all tasks."""
    client.actions.create(
        id="retrieve_tasks_predictions", project=project, selected_items={"all": True}
    )
    return predictions_of(client, project, version)


def relabelled(result: list[dict], name: str) -> list[dict]:
    """The regions as a reviewer submits them after giving every one the class ``name``."""
    return [
        {key: value for key, value in region.items() if key != "score"}
        | {"value": {**region["value"], "brushlabels": [name]}}
        for region in result
    ]


def backend_health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=30).json()


def wait_for_finetune(url: str, seconds: float) -> dict:
    """The backend's /health once it serves a new model_version."""
    deadline = time.monotonic() + seconds
    while True:
        health = backend_health(url)
        if health["model_version"] != FIRST and not health["finetuning"]:
            return health
        assert health["last_finetune_error"] is None, health
        assert time.monotonic() < deadline, f"no fine-tune within {seconds:.0f} s: {health}"
        time.sleep(2)


def test_corrections_submitted_in_label_studio_fine_tune_the_backend(tmp_path, monkeypatch, capsys):
    head = head_checkpoint(tmp_path / "head.ckpt", classes=CLASSES)
    out = tmp_path / "backend"
    port = free_port()
    overrides = [
        f"ckpt={head}",
        f"out={out}",
        f"port={port}",
        f"paths.root_dir={tmp_path}",
        *SERVE,
    ]
    amg = settings_from_config(AmgSettings, compose_config("serve", overrides).amg, "amg")
    inference = InferenceSettings(confidence_threshold=0.3)

    def annotator(checkpoint: Path) -> Annotator:
        return Annotator(Predictor(load_head(checkpoint), inference, "cpu"), "tiny", amg=amg)

    with label_studio(tmp_path) as server:
        personal = server.client().tokens.create().token
        client = LabelStudio(base_url=server.url, api_key=personal)
        client.jwt_settings.update(
            api_token_ttl_days=200 * 365, api_tokens_enabled=True, legacy_api_tokens_enabled=False
        )
        photos = server.document_root / "photos"
        photos.mkdir()
        for seed, name in enumerate(NAMES):
            Image.fromarray(drawn(seed, step=3)).save(photos / name)
        command = [
            sys.executable, "-m", "usam.serve", f"document_root={server.document_root}",
            f"label_studio.url={server.url}", *overrides,
        ]  # fmt: skip
        backend = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        environment = os.environ | {"LABEL_STUDIO_API_KEY": personal}
        with serving(command, environment, log, f"{backend}/health", 300):
            project = client.projects.create(
                title="usam review", label_config=label_config(CLASSES, False)
            ).id
            client.import_storage.local.create(project=project, path=str(photos), title="photos")
            local = [{"data": {"image": f"{LOCAL_FILES}photos/{n}"}} for n in NAMES[:-1]]
            client.projects.import_tasks(id=project, request=local)
            access = client.tokens.refresh(refresh=personal).access
            upload(server, access, project, photos / UPLOADED)
            tasks = {photo_name(t.data["image"]): t for t in client.tasks.list(project=project)}
            assert tasks[UPLOADED].data["image"].startswith(f"/data/upload/{project}/")
            connected = client.ml.create(url=backend, project=project, title="usam")
            assert connected.model_version == FIRST
            hooks = client.webhooks.list(project=str(project))
            assert [(hook.url, hook.send_for_all_actions) for hook in hooks] == [
                (f"{backend}/webhook", True)
            ]

            first = retrieve_predictions(client, project, FIRST)
            assert sorted(first) == NAMES
            starting = annotator(head)
            expected = {name: starting(photos / name) for name in NAMES}
            for name in NAMES:
                assert len(expected[name].labels) >= 2, name  # something to correct
                assert_is(first[name], expected[name])

            # the class the head gives least to the corrected images' regions becomes theirs
            given = np.concatenate([expected[name].labels for name in CORRECTED])
            target = int(np.bincount(given, minlength=len(CLASSES)).argmin())
            submitted = {}
            for count, name in enumerate(CORRECTED, start=1):
                submitted[name] = relabelled(first[name].result, CLASSES[target])
                client.annotations.create(
                    id=first[name].task, result=submitted[name], was_cancelled=False
                )
                if count < len(CORRECTED):  # the webhook came before create returned
                    health = backend_health(backend)
                    assert (health["annotations_pending"], health["finetuning"]) == (count, False)

            health = wait_for_finetune(backend, 300)
            assert health["model_version"] == TUNED
            assert health["annotations_pending"] == 0

            second = retrieve_predictions(client, project, TUNED)
            assert client.ml.list(project=project)[0].model_version == TUNED
            assert sorted(second) == NAMES
            assert predictions_of(client, project, FIRST).keys() == first.keys()  # kept

            pointer = json.loads((out / "current.json").read_text())
            tuned_head = load_head(out / pointer["ckpt"])
            review = tuned_head.metadata.review
            assert (review["images"], review["regions"], review["skipped"]) == (
                len(CORRECTED),
                len(given),
                0,
            )
            tuned = annotator(out / pointer["ckpt"])
            now = {name: tuned(photos / name) for name in NAMES}
            for name in NAMES:
                assert_is(second[name], now[name])
            before = [(expected[name].labels == target).mean() for name in CORRECTED]
            after = [(now[name].labels == target).mean() for name in CORRECTED]
            assert max(before) < 0.5 and min(after) == 1.0

        # the project read back as a review, through the personal access token
        source = f"{server.url}/projects/{project}"
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", personal)
        review = read_review(source, CLASSES, None)
        names = {name: reviewed_name(tasks[name].data["image"]) for name in NAMES}
        assert [image.file_name for image in review.images] == [names[n] for n in CORRECTED]
        for image, name in zip(review.images, CORRECTED, strict=True):
            labels, masks = brush_regions(submitted[name])
            assert [CLASSES[label] for label in image.labels] == labels
            np.testing.assert_array_equal(image.masks, masks)
        assert sorted(review.skipped) == sorted(
            f"task {tasks[name].id} ({names[name]}): no submitted annotation, skipped"
            for name in NAMES[len(CORRECTED) :]
        )
        fit = [
            "stage=finetune",
            f"finetune.head_ckpt={head}",
            f"finetune.review={source}",
            f"finetune.images={server.document_root}",
            "finetune.max_epochs=2",
            "logger=wandb",
            "paths.output_dir=run",
            *TINY_EXTRACT,
        ]
        (tmp_path / "fit").mkdir()
        capsys.readouterr()
        code, stderr = run_entry("fit", *fit, cwd=tmp_path / "fit")
        assert code == 0, stderr
        finetune = f"finetune: {len(CORRECTED)} images, {len(given)} regions from {source}"
        assert finetune in capsys.readouterr().out.splitlines()
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)  # the legacy token, disabled above
        with pytest.raises(ReviewError) as refused:
            read_review(source, CLASSES, None)
        assert str(refused.value) == (
            f"{source}: HTTP 401 (Authentication token no longer valid: legacy token "
            "authentication has been disabled for this organization); check that Label Studio "
            f"serves {server.url} and LABEL_STUDIO_API_KEY holds a personal access token of it "
            "(Account & Settings), or a legacy token where they are enabled"
        )
