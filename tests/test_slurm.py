"""``usam.fit`` as ``srun`` starts it (docs/clusters.md): one process per task, each with the
variables SLURM sets, which Lightning's ``SLURMEnvironment`` reads for its rank and the
world size; here 2 tasks on one node, on CPU."""

from __future__ import annotations

import csv
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from usam.formats.embedding_shards import read_manifest

from helpers.commands import compose_config, wait_for
from helpers.shards import SMALL_CLASSES

TASKS = 2
EXIT_BOUND_S = 300  # only ends a hang
BATCH_SIZE = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_task(rank: int, port: int) -> dict[str, str]:
    """The environment of task ``rank`` of a 1-node, 2-task job, as srun gives it."""
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")
    env = {key: value for key, value in os.environ.items() if key not in launcher_keys}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "usam-fit",  # not bash or interactive: Lightning detects SLURM
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": str(TASKS),
        "SLURM_NTASKS_PER_NODE": str(TASKS),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _job(tmp_path: Path, max_epochs: int) -> tuple[list[str], Path]:
    """The job's fit overrides, and its training shard set, written before the job as
    extracted ones are: tasks start together, and two writing one synthetic set would race."""
    overrides = [
        "data=synthetic",
        f"data.classes=[{','.join(SMALL_CLASSES)}]",
        "data.synthetic.images_per_class=12",
        f"data.batch_size={BATCH_SIZE}",
        "stage=teacher",
        "trainer=ddp",
        f"trainer.devices={TASKS}",
        "trainer.num_nodes=1",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={max_epochs}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    data = compose_config("fit", overrides).data
    instantiate(data).prepare_data()
    return overrides, Path(data.train_dir)


def _srun(tmp_path: Path, overrides: list[str], name: str) -> list[subprocess.Popen]:
    """``srun python -m usam.fit <overrides>``: one process per task, output in
    ``<name><rank>.log``."""
    port = _free_port()
    tasks = []
    for rank in range(TASKS):
        with (tmp_path / f"{name}{rank}.log").open("w") as output:
            tasks.append(
                subprocess.Popen(
                    [sys.executable, "-m", "usam.fit", *overrides],
                    cwd=tmp_path,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=_slurm_task(rank, port),
                )
            )
    return tasks


def _finish(tasks: list[subprocess.Popen], signum: int | None = None) -> list[int]:
    """The tasks' exit codes, once ``signum`` (if any) went to each; none is left running."""
    try:
        for task in tasks if signum else ():
            task.send_signal(signum)
        return [task.wait(timeout=EXIT_BOUND_S) for task in tasks]
    finally:
        for task in tasks:
            task.kill()


def _outputs(tmp_path: Path, name: str) -> list[str]:
    return [(tmp_path / f"{name}{rank}.log").read_text() for rank in range(TASKS)]


def test_two_slurm_tasks_train_as_one_two_rank_run(tmp_path):
    overrides, train_dir = _job(tmp_path, max_epochs=1)
    codes = _finish(_srun(tmp_path, overrides, "task"))
    outputs = _outputs(tmp_path, "task")
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    for rank, output in enumerate(outputs):  # each task joined the same 2-rank group
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{TASKS}" in output
    assert "SLURM auto-requeueing enabled" not in outputs[0]  # fit stops on SIGTERM itself
    assert "usam.fit finished" in outputs[0] and "usam.fit finished" not in outputs[1]

    checkpoint = torch.load(
        tmp_path / "run" / "checkpoints" / "teacher" / "resume.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    # one epoch is the batches of one rank's half of the training images
    train_images = read_manifest(train_dir).num_images
    assert checkpoint["global_step"] == math.ceil(train_images / (TASKS * BATCH_SIZE))


@pytest.mark.slow
def test_a_preempted_slurm_job_stops_on_every_task_and_its_requeued_run_resumes(tmp_path):
    """SLURM sends SIGTERM to every task at once: the ranks stop together (none is left
    waiting in a collective), and the same command on both tasks resumes the epochs."""
    max_epochs = 6
    overrides, _ = _job(tmp_path, max_epochs)
    tasks = _srun(tmp_path, overrides, "stopped")
    resume = tmp_path / "run" / "checkpoints" / "teacher" / "resume.ckpt"
    try:
        wait_for(
            resume.is_file,
            "the first epoch's checkpoint",
            process=tasks[0],
            output=lambda: _outputs(tmp_path, "stopped")[0],
        )
    finally:
        codes = _finish(tasks, signal.SIGTERM)
    outputs = _outputs(tmp_path, "stopped")
    assert codes == [143, 143], "\n".join(output[-3000:] for output in outputs)
    assert ["the same command resumes:" in output for output in outputs] == [True, False]
    saved_epoch = torch.load(resume, map_location="cpu", weights_only=False)["epoch"]
    assert saved_epoch < max_epochs - 1

    codes = _finish(_srun(tmp_path, overrides, "requeued"))
    assert codes == [0, 0], "\n".join(output[-3000:] for output in _outputs(tmp_path, "requeued"))
    with (tmp_path / "run" / "csv" / "teacher" / "version_1" / "metrics.csv").open() as rows:
        trained = {int(row["epoch"]) for row in csv.DictReader(rows) if row["train/loss"]}
    assert sorted(trained) == list(range(saved_epoch + 1, max_epochs))
