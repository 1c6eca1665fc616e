"""The annotations Label Studio's webhook delivers, one JSON file per task, so that a
restart loses none and a task annotated again replaces its earlier annotation.

Each file holds the task as Label Studio sent it with that one annotation under
``annotations`` (the form ``review_of_tasks`` reads), the image field of the project's
config, and ``received``: a number that grows with every delivery, by which a fine-tune
records what it has seen and the backend counts what came after.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path

from usam.formats.storage import atomic_write_text
from usam.serving.errors import RequestError


def task_key(task: Mapping) -> str:
    """The name of a task's annotation file and of its SAM proposals."""
    return f"task-{task['id']}"


class ReceivedAnnotations:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._received = {task_key(e["task"]): e["received"] for e in self._entries()}

    def _entries(self) -> list[dict]:
        if not self.folder.is_dir():
            return []
        return [json.loads(path.read_text()) for path in sorted(self.folder.glob("task-*.json"))]

    def store(self, task: Mapping, annotation: Mapping, image_field: str) -> int:
        """Writes ``annotation`` as ``task``'s (replacing an earlier one); its number."""
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise RequestError("the webhook's task has no integer id")
        with self._lock:
            number = self.latest + 1
            entry = {
                "received": number,
                "image_field": image_field,
                "task": {**task, "annotations": [dict(annotation)]},
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / f"{task_key(task)}.json", json.dumps(entry))
            self._received[task_key(task)] = number
            return number

    @property
    def latest(self) -> int:
        return max(self._received.values(), default=0)

    def since(self, received: int) -> int:
        """How many tasks were annotated after delivery number ``received``."""
        return sum(number > received for number in list(self._received.values()))

    def entries(self) -> list[dict]:
        """Every stored entry (``received``, ``image_field``, ``task``), by task."""
        with self._lock:
            return self._entries()
