"""Rich progress bars that show items per second and the time left, for the image jobs."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class SpeedColumn(ProgressColumn):
    """Items per second; a finished task keeps its final rate instead of falling to 0, and one
    done in a single step (a whole batch at once) shows its average up to its end (not over
    ``elapsed``, which keeps growing while later tasks run)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.finished_time:
            speed = task.completed / task.finished_time
        return Text("-- img/s" if speed is None else f"{speed:.2f} img/s")


def progress_bar(*extra: ProgressColumn, enabled: bool = True) -> Progress:
    """Description, bar, done/total, img/s, any ``extra`` columns, then the ETA (on stderr)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        SpeedColumn(),
        *extra,
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
