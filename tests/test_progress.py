"""Progress bars say a finished task keeps its rate; an unstarted one has none."""

from __future__ import annotations

from rich.progress import Progress

from usam.core.progress import SpeedColumn


def test_speed_is_unknown_before_work_and_kept_after_it():
    clock = iter(float(t) for t in range(100))
    progress = Progress(SpeedColumn(), get_time=lambda: next(clock))
    task = progress.add_task("images", total=4)
    assert str(SpeedColumn().render(progress.tasks[task])) == "-- img/s"
    for _ in range(4):
        progress.advance(task)  # one image per tick of the clock
    assert progress.tasks[task].finished
    assert str(SpeedColumn().render(progress.tasks[task])) == "1.00 img/s"


def test_a_task_done_in_one_step_keeps_its_average_rate():
    """4 images in one batch 2 s after the start: 2.00 img/s, still so while later tasks run."""
    now = [0.0]
    progress = Progress(SpeedColumn(), get_time=lambda: now[0])
    task = progress.add_task("a class of images", total=4)
    now[0] = 2.0
    progress.advance(task, 4)  # a whole batch rendered at once
    assert str(SpeedColumn().render(progress.tasks[task])) == "2.00 img/s"
    now[0] = 10.0  # the next classes are being generated
    assert str(SpeedColumn().render(progress.tasks[task])) == "2.00 img/s"
