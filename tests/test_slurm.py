"""``usam.fit`` as ``srun`` starts it (docs/clusters.md): one process per task, each with the
variables SLURM sets, which Lightning's ``SLURMEnvironment`` reads for its rank and the
world size; here 2 tasks on one node, on CPU."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from usam.formats.embedding_shards import read_manifest

from helpers.commands import compose_config
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


def test_two_slurm_tasks_train_as_one_two_rank_run(tmp_path):
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
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    # the shards exist before the job, as extracted ones do: tasks start together, and
    # two writing the same synthetic set at once would race
    data = compose_config("fit", overrides).data
    instantiate(data).prepare_data()
    train_images = read_manifest(Path(data.train_dir)).num_images
    port = _free_port()
    logs = [tmp_path / f"task{rank}.log" for rank in range(TASKS)]
    tasks = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:
            tasks.append(
                subprocess.Popen(
                    [sys.executable, "-m", "usam.fit", *overrides],
                    cwd=tmp_path,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=_slurm_task(rank, port),
                )
            )
    try:
        codes = [task.wait(timeout=EXIT_BOUND_S) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    outputs = [log.read_text() for log in logs]
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
    assert checkpoint["global_step"] == math.ceil(train_images / (TASKS * BATCH_SIZE))
