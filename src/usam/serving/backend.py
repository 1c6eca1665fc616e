"""The model behind the ML backend: predictions for Label Studio's tasks, the annotations
its webhook delivers, and the fine-tunes they start.

Predictions are ``usam.annotate``'s: SAM's masks of the task's image through the head,
as the brush (and with ``polygons`` outline) regions of its Label Studio export. Every
``finetune_every`` annotations delivered since the head in use was made, one background
thread fine-tunes the starting head (``ckpt``) on every annotation kept so far (never two
at once), then the new head replaces the old between two requests and ``model_version``
names it. ``out/current.json`` points at the newest fine-tune, from which a restart
resumes; it is written after the head, so it never points at half of one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usam.core.errors import UsageError
from usam.core.provenance import Provenance
from usam.formats.embedding_shards import ImageRecord
from usam.formats.storage import atomic_write_text
from usam.inference.annotator import Annotator
from usam.inference.label_studio import model_version, prediction_regions
from usam.inference.predictor import HeadCheckpoint, Predictor, load_head
from usam.review.finetune import FineTuneSettings, finetune_head
from usam.review.label_studio_tasks import review_of_tasks
from usam.serving.errors import RequestError
from usam.serving.limits import Limits
from usam.serving.project_config import ProjectConfig, project_config
from usam.serving.received import ReceivedAnnotations, task_key
from usam.serving.task_images import TaskImages

log = logging.getLogger(__name__)

SUBMITTED = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ANNOTATIONS_DIR = "annotations"
FINETUNES_DIR = "finetunes"
CURRENT_NAME = "current.json"


class ResumeError(UsageError, ValueError):
    """An ``out`` folder holding the fine-tunes of another starting head."""


@dataclass(frozen=True)
class BackendSettings:
    out: Path  # received annotations, fine-tuned heads and current.json
    finetune_every: int = 10  # annotations delivered since the head in use that start a fine-tune
    polygons: bool = False  # also one outline region per connected part of each mask


@dataclass(frozen=True)
class CurrentHead:
    """The head in use, swapped whole so that a request sees one head from start to end."""

    predictor: Predictor
    model_version: str
    generation: int  # 0: the starting head, n: the n-th fine-tune
    through: int  # the last delivery it was fine-tuned on (0: none)


class Backend:
    def __init__(
        self,
        annotator: Annotator,
        settings: BackendSettings,
        finetune: FineTuneSettings,
        images: TaskImages,
        limits: Limits,
        provenance: Provenance,
    ) -> None:
        """``annotator``: the starting head with its SAM (built once and kept); ``provenance``
        of both, which every ``model_version`` carries when its weights are random."""
        self.annotator = annotator
        self.settings = settings
        self.finetune_settings = finetune
        self.images = images
        self.limits = limits
        self.provenance = provenance
        self.received = ReceivedAnnotations(settings.out / ANNOTATIONS_DIR)
        self.last_finetune_error: str | None = None
        self._records: OrderedDict[str, tuple[str, ImageRecord]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._sam_lock = threading.Lock()
        self._finetune_lock = threading.Lock()
        self._finetuning: threading.Thread | None = None
        self.current = self._resume()

    @property
    def classes(self) -> list[str]:
        return self.annotator.classes

    @property
    def finetuning(self) -> bool:
        return self._finetuning is not None and self._finetuning.is_alive()

    def _head(self, predictor: Predictor, generation: int, through: int) -> CurrentHead:
        """``model_version`` names the starting head's file, the fine-tune and the SAM."""
        start = self.annotator.predictor.checkpoint.path
        name = start.name if start else "head"
        tuned = f" fine-tune {generation}" if generation else ""
        sam = self.annotator.sam_model_type
        version = model_version(name + tuned, sam, self.provenance.random_weights)
        return CurrentHead(predictor, version, generation, through)

    def _resume(self) -> CurrentHead:
        """The newest fine-tune recorded in ``out``, else the starting head."""
        start = self._head(self.annotator.predictor, 0, 0)
        pointer_file = self.settings.out / CURRENT_NAME
        if not pointer_file.is_file():
            return start
        pointer = json.loads(pointer_file.read_text())
        base = self.annotator.predictor.checkpoint.path
        if base is None or pointer["base"] != str(base.resolve()):
            raise ResumeError(
                f"{pointer_file} holds fine-tunes of {pointer['base']}, not of {base}: pass "
                f"ckpt={pointer['base']} to resume them, or another out= to start afresh"
            )
        predictor = self._predictor(load_head(self.settings.out / pointer["ckpt"]))
        return self._head(predictor, pointer["generation"], pointer["through"])

    def _predictor(self, head: HeadCheckpoint) -> Predictor:
        old = self.annotator.predictor
        return Predictor(head, old.settings, old.device)

    def health(self) -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "usam",
            "model_version": self.current.model_version,
            "finetuning": self.finetuning,
            "annotations_pending": self.received.since(self.current.through),
            "last_finetune_error": self.last_finetune_error,
        }

    def _project(self, label_config: object) -> ProjectConfig:
        return project_config(label_config, self.classes, self.settings.polygons)

    def setup(self, payload: Mapping) -> dict[str, Any]:
        """Label Studio's check of a project: its config (``schema``) must fit the head."""
        self._project(payload.get("schema"))
        return {"model_version": self.current.model_version}

    def predict(self, payload: Mapping) -> dict[str, Any]:
        """One prediction per task, in order, for at most ``limits.max_tasks`` tasks and
        until ``limits.predict_seconds`` pass (the task in progress is finished). A request
        it cannot answer whole (Label Studio's "Retrieve predictions" sends every selected
        task at once) is answered with its first task's prediction alone: Label Studio then
        asks for each task on its own (``ml/models.py``, one by one when a backend returns
        one result for several tasks), and SAM's proposals of the tasks predicted are cached."""
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks (a non-empty list under 'tasks')")
        config = self._project(payload.get("label_config"))
        head = self.current
        deadline = time.monotonic() + self.limits.predict_seconds
        results = []
        for task in tasks[: self.limits.max_tasks]:
            results.append(self._predict_task(task, config, head))
            if time.monotonic() > deadline:
                break
        answer: dict[str, Any] = {"results": results}
        if len(results) < len(tasks):
            answer["results"] = results[:1]
            answer["note"] = (
                f"{len(results)} of {len(tasks)} tasks predicted within limits.max_tasks="
                f"{self.limits.max_tasks} and limits.predict_seconds="
                f"{self.limits.predict_seconds}: the first task's prediction alone is "
                "returned, ask for the others one at a time"
            )
        return answer

    def _predict_task(self, task: object, config: ProjectConfig, head: CurrentHead) -> dict:
        if not isinstance(task, Mapping) or not isinstance(task.get("id"), int):
            raise RequestError("every task needs an integer 'id' and its 'data'")
        record = self._record(task, config.image_field)
        prediction = head.predictor(record).with_pixels()
        regions = prediction_regions(prediction, self.classes, config.polygon is not None)
        return {
            "result": config.addressed(regions),
            "score": 1.0 - prediction.uncertainty(),
            "model_version": head.model_version,
        }

    def _record(self, task: Mapping, image_field: str) -> ImageRecord:
        """SAM's proposals of the task's image, run once per image while it is cached."""
        key, data = task_key(task), task.get("data")
        address = data.get(image_field) if isinstance(data, Mapping) else None
        with self._cache_lock:
            cached = self._records.get(key)
        if cached is not None and cached[0] == address:
            return cached[1]
        image = self.images(task, image_field)
        with self._sam_lock:
            record = self.annotator.engine.generate(np.ascontiguousarray(image)).to_record(key)
        with self._cache_lock:
            self._records[key] = (address, record)
            self._records.move_to_end(key)
            while len(self._records) > self.limits.sam_cache:
                self._records.popitem(last=False)
        return record

    def webhook(self, payload: Mapping) -> dict[str, Any]:
        """Keeps a submitted annotation and starts a fine-tune when one is due; any other
        action is acknowledged and ignored."""
        action = payload.get("action")
        if action not in SUBMITTED:
            return {"status": "ignored", "action": action}
        annotation, task, project = (payload.get(k) for k in ("annotation", "task", "project"))
        if not all(isinstance(part, Mapping) for part in (annotation, task, project)):
            raise RequestError(f"{action} needs the 'annotation', 'task' and 'project' objects")
        config = self._project(project.get("label_config"))
        received = self.received.store(task, annotation, config.image_field)
        started = self.start_finetune_when_due()
        return {"status": "stored", "task": task["id"], "received": received, "finetune": started}

    def start_finetune_when_due(self) -> bool:
        """Starts the background fine-tune when ``finetune_every`` annotations came since the
        head in use was made and none is running; whether it started one."""
        with self._finetune_lock:
            if self.finetuning:
                return False
            through = self.received.latest
            if self.received.since(self.current.through) < self.settings.finetune_every:
                return False
            self._finetuning = threading.Thread(
                target=self._finetune, args=(through,), name="usam-finetune", daemon=True
            )
            self._finetuning.start()
            return True

    def _finetune(self, through: int) -> None:
        """Fine-tunes the starting head on every kept annotation, then serves it. A failure
        is logged and kept for /health; the next delivery tries again."""
        generation = self.current.generation + 1
        try:
            path = self._finetuned_head(generation)
            predictor = self._predictor(load_head(path))
            pointer = {
                "base": str(self.annotator.predictor.checkpoint.path.resolve()),
                "ckpt": path.relative_to(self.settings.out).as_posix(),
                "generation": generation,
                "through": through,
            }
            atomic_write_text(self.settings.out / CURRENT_NAME, json.dumps(pointer))
            self.current = self._head(predictor, generation, through)
            self.last_finetune_error = None
            log.info("serving %s", self.current.model_version)
        except Exception as error:  # the server goes on with the head it has
            log.exception("fine-tune %d failed", generation)
            self.last_finetune_error = f"fine-tune {generation}: {error}"
            return
        self.start_finetune_when_due()

    def _finetuned_head(self, generation: int) -> Path:
        """The head fine-tuned on every kept annotation; an image that cannot be fetched now
        is left out with a line in the review's ``skipped``, as an unusable region is."""
        entries = {task_key(entry["task"]): entry for entry in self.received.entries()}
        tasks = [entry["task"] for entry in entries.values()]
        read = review_of_tasks(tasks, self.classes, str(self.received.folder), task_key)
        records, skipped = {}, list(read.skipped)
        for image in read.images:
            entry = entries[image.file_name]
            try:
                records[image.file_name] = self._record(entry["task"], entry["image_field"])
            except RequestError as error:
                skipped.append(f"{image.file_name}: {error}, skipped")
        kept = tuple(image for image in read.images if image.file_name in records)
        review = dataclasses.replace(read, images=kept, skipped=tuple(skipped))
        for line in review.skipped:
            log.warning("fine-tune %d: %s", generation, line)
        output = self.settings.out / FINETUNES_DIR / str(generation)
        head = self.annotator.predictor.checkpoint
        return finetune_head(head, review, records, self.finetune_settings, output)
