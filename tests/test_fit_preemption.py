"""``usam.fit`` under SIGTERM (a cluster's preemption): it stops after the batch in progress
with exit code 143 and one line naming the command that resumes; that command continues the
epoch count from the last finished epoch and ends with the head an uninterrupted run with the
same seed ends with, since an epoch's data order and dropout come from the seed and the epoch.

The signal goes once the first epoch's resume checkpoint is on disk, so whether it lands in
the next epoch's training or validation, the resumed run restarts at an epoch boundary."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usam.commands.fit import run

from helpers.commands import compose_config, run_overrides, wait_for

MAX_EPOCHS = 8
EXIT_BOUND_S = 300  # only ends a hang


def _overrides(tmp_path: Path, run_dir: str) -> list[str]:
    return [
        *run_overrides(tmp_path, tmp_path / "data", "stage=teacher", "logger=csv"),
        f"trainer.max_epochs={MAX_EPOCHS}",
        "trainer.log_every_n_steps=1",
        f"paths.output_dir={run_dir}",  # relative: the resume line must name it absolute
    ]


def _trained_epochs(metrics_csv: Path) -> list[int]:
    with metrics_csv.open() as rows:
        return sorted({int(row["epoch"]) for row in csv.DictReader(rows) if row["train/loss"]})


def _head(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigterm_saves_and_the_printed_command_resumes_to_the_uninterrupted_head(tmp_path):
    run(compose_config("fit", _overrides(tmp_path, str(tmp_path / "whole"))))
    uninterrupted = _head(tmp_path / "whole" / "checkpoints" / "teacher" / "resume.ckpt")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stopped.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "usam.fit", *_overrides(tmp_path, "stopped")],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
        resume = tmp_path / "stopped" / "checkpoints" / "teacher" / "resume.ckpt"
        try:
            wait_for(
                resume.is_file,
                "the first epoch's checkpoint",
                process=process,
                output=log.read_text,
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=EXIT_BOUND_S) == 143, log.read_text()[-3000:]
        finally:
            process.kill()
    output = log.read_text().splitlines()
    assert "stopping after the batch in progress (signal again to stop at once)" in output
    lines = [line for line in output if "the same command resumes:" in line]
    assert len(lines) == 1, log.read_text()[-3000:]
    assert lines[0].startswith("stopped by SIGTERM: teacher: ")
    saved_epoch = torch.load(resume, map_location="cpu", weights_only=False)["epoch"]
    assert f"teacher: {saved_epoch + 1} of {MAX_EPOCHS} epochs kept in" in lines[0]
    assert saved_epoch < MAX_EPOCHS - 1  # stopped before the end

    command = shlex.split(lines[0].split("the same command resumes: ", 1)[1])
    assert command[:3] == ["python", "-m", "usam.fit"]
    assert f"paths.output_dir={tmp_path / 'stopped'}" in command
    resumed = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=EXIT_BOUND_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = tmp_path / "stopped" / "csv" / "teacher"
    assert _trained_epochs(logs / "version_1" / "metrics.csv") == list(
        range(saved_epoch + 1, MAX_EPOCHS)
    )  # the epochs continue, they do not start again
    assert max(_trained_epochs(logs / "version_0" / "metrics.csv")) <= saved_epoch + 1

    stopped_and_resumed = _head(resume)
    assert stopped_and_resumed.keys() == uninterrupted.keys()
    for name, weights in uninterrupted.items():
        torch.testing.assert_close(stopped_and_resumed[name], weights, rtol=1e-5, atol=1e-6)
