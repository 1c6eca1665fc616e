"""Stopping long commands: SIGTERM and SIGINT end them at the next image boundary, with exit
codes 143 / 130 and a line naming what is done and the command that resumes; SIGKILL leaves
no loader worker behind; a resumed run gives the files of an uninterrupted one.

Each command runs in a session of its own so that every process it started can be counted
in /proc afterwards, orphans included. A signal goes once the command has an image on disk,
and the stop is judged by how much was done, not by the clock: a loaded machine only slows
both sides; the time bounds below only end a hang."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import usam.images.web_crawl as web_crawl
from usam.commands import annotate, generate
from usam.core.stopping import Stopped, stoppable
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import iter_images
from usam.images.ingest_settings import IngestSettings
from usam.testing.tiny_diffusion import save_tiny_pipeline

from helpers.commands import compose_config, wait_for
from helpers.evaluation import head_checkpoint

EXIT_BOUND_S = 120  # from the signal to the exit, and for the last process of the command
ANNOTATE = [
    "sam=tiny",
    "amg.points_per_side=8",
    "extract.num_workers=2",  # the loader workers that used to be left orphaned
    "extract.trainer.accelerator=cpu",
    "extract.trainer.enable_progress_bar=false",
    "device=cpu",
    "inference.confidence_threshold=0.3",
    "progress=false",
]


def session_processes(session: int) -> list[int]:
    """Live processes of a session (zombies excluded), whoever their parent is now."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue  # not a process, or it just ended
        state, _, _, sid = stat.rsplit(")", 1)[1].split()[:4]
        if int(sid) == session and state != "Z":
            found.append(int(entry.name))
    return found


def stop_midway(
    command: list[str],
    signum: int,
    ready: Callable[[], bool],
    tmp_path: Path,
    to_group: bool = True,
) -> tuple[int, str]:
    """Run ``command``, send ``signum`` once ``ready()``; (exit code, output).
    SIGINT goes to the whole process group, as a terminal's Ctrl-C does, unless
    ``to_group`` is false; the others to the command alone, as ``kill`` does. Fails if any
    process of the command outlives it. Before a SIGKILL its helpers are paused, so that
    only the kernel's parent-death signal can end them (PyTorch's loader workers would
    otherwise notice their orphaning on their own, seconds later)."""
    log = tmp_path / f"output-{signum}.txt"
    with log.open("w") as handle:
        child = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        wait_for(ready, "an image on disk", process=child, output=log.read_text)
        if signum == signal.SIGKILL:
            helpers = [pid for pid in session_processes(child.pid) if pid != child.pid]
            assert helpers, "no loader worker to leave behind"
            for pid in helpers:
                os.kill(pid, signal.SIGSTOP)
        if signum == signal.SIGINT and to_group:
            os.killpg(child.pid, signum)
        else:
            os.kill(child.pid, signum)
        code = child.wait(timeout=EXIT_BOUND_S)
        wait_for(  # killed loader workers and ranks take the kernel a moment to end
            lambda: not session_processes(child.pid),
            "the command's last process ending",
            output=lambda: f"processes {session_processes(child.pid)} outlived the command",
            seconds=EXIT_BOUND_S,
        )
    finally:  # whatever failed above, nothing of the command runs on
        for pid in session_processes(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait()
    return code, log.read_text()


def resume_line(output: str, command: str) -> list[str]:
    """The arguments of the resume command the stopped run printed."""
    lines = [line for line in output.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, output[-3000:]
    prefix = f"the same command resumes: python -m usam.{command} "
    assert prefix in lines[0], lines[0]
    return shlex.split(lines[0].split(prefix, 1)[1])


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six small drawn photos, a head for the tiny SAM, and their uninterrupted annotation."""
    root = tmp_path_factory.mktemp("stopping")
    images = root / "images"
    images.mkdir()
    for i in range(6):
        picture = np.full((48, 64, 3), 30 + 10 * i, np.uint8)
        picture[6 + i : 30, 4 : 30 + i] = (200, 60, 60)
        picture[20:44, 36:60] = (60, 60, 200 - 10 * i)
        Image.fromarray(picture).save(images / f"photo{i}.png")
    ckpt = head_checkpoint(root / "head.ckpt")
    reference = root / "reference"
    annotate.run(compose_config("annotate", annotate_args(root, images, ckpt, reference)))
    return root, images, ckpt, tree(reference)


def annotate_args(root: Path, images: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        f"images={images}",
        f"ckpt={ckpt}",
        f"out={out}",
        f"paths.root_dir={root}",
        *ANNOTATE,
    ]


DDP = ["extract.trainer.devices=2", "extract.trainer.strategy=ddp"]


@pytest.mark.parametrize(
    ("signum", "extra"),
    [(signal.SIGTERM, []), (signal.SIGINT, []), (signal.SIGKILL, []), (signal.SIGINT, DDP)],
    ids=["sigterm", "sigint", "sigkill", "sigint-to-rank-zero-of-two"],
)
def test_annotate_stopped_in_the_sam_stage_leaves_nothing_behind_and_resumes(
    photos, tmp_path, signum, extra
):
    """Under DDP the SIGINT reaches rank zero alone, which passes it on to the other rank."""
    root, images, ckpt, reference = photos
    out = tmp_path / "out"
    args = [*annotate_args(root, images, ckpt, out), *extra]
    command = [sys.executable, "-m", "usam.annotate", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    ready = lambda: any((out / "sam").glob("*/eval/*.tar"))  # noqa: E731
    code, output = stop_midway(command, signum, ready, tmp_path, to_group=not extra)
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        sam = out / "sam"  # killed inside the SAM stage: shards, no manifest yet
        assert any(sam.glob("*/eval/*.tar")) and not any(sam.glob("*/eval/manifest.json"))
        resumed_args = args
    else:
        assert code == 128 + signum, output[-3000:]
        resumed_args = resume_line(output, "annotate")
        assert resumed_args == command[3:]
        done = re.search(r"(\d+) of 6 images annotated in .+SAM's masks of (\d+) more", output)
        assert done, output[-3000:]
        # stopped at an image boundary of the SAM stage, not after SAM's last image
        assert int(done[1]) == 0 and 1 <= int(done[2]) < 6, done[0]
    resumed_args = [a for a in resumed_args if "hydra." not in a and a not in DDP]
    annotate.run(compose_config("annotate", resumed_args))
    assert tree(out) == reference


def test_generate_stopped_by_sigterm_resumes_to_the_same_images(tmp_path):
    model = save_tiny_pipeline(tmp_path / "tiny_sd")
    args = [
        "generate=tiny",
        f"generate.model={model}",
        "data.classes=[cat,dog]",
        "generate.per_class=8",
        "generate.batch_size=1",
        "generate.images_per_shard=1",
        f"paths.root_dir={tmp_path}",
    ]
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "usam.generate", *args, f"generate.out_dir={out}"]
    command.append(f"hydra.run.dir={tmp_path / 'run'}")
    code, output = stop_midway(command, signal.SIGTERM, lambda: any(out.glob("*.tar")), tmp_path)
    assert code == 143, output[-3000:]
    assert resume_line(output, "generate") == command[3:]
    made = re.search(rf"stopped by SIGTERM: (\d+) images in {re.escape(str(out))};", output)
    assert made and 1 <= int(made[1]) < 16, output[-3000:]  # stopped before the last image
    generate.run(compose_config("generate", [*args, f"generate.out_dir={out}"]))
    whole = tmp_path / "whole"
    generate.run(compose_config("generate", [*args, f"generate.out_dir={whole}"]))
    assert images_of(out) == images_of(whole)


def images_of(directory: Path) -> dict[str, tuple[bytes, dict]]:
    return {key: (image.tobytes(), meta) for key, image, meta in iter_images(directory)}


def test_ingest_stops_at_the_next_image_and_resumes_to_the_same_set(tmp_path, monkeypatch, capsys):
    vocab = load_vocabulary(["cat", "dog"])
    root = tmp_path / "photos"
    for i in range(8):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    settings = IngestSettings(kind="folder", workers=1, images_per_shard=1)
    decode = web_crawl.decode_image
    calls = []

    def decode_then_interrupt(data, settings):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C during the third image
        return decode(data, settings)

    monkeypatch.setattr(web_crawl, "decode_image", decode_then_interrupt)
    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGINT)  # ignored where the tests run in the background
    with pytest.raises(Stopped) as stop, stoppable("ingest", lambda: "some images"):
        web_crawl.ingest_folder(root, vocab, out, settings, progress=False)
    assert stop.value.code == 130
    assert "stopped by SIGINT: some images; the same command resumes" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # put back
    kept = len(list(out.glob("*.tar")))
    assert 1 <= kept < 8  # stopped midway, with what was finished on disk
    monkeypatch.setattr(web_crawl, "decode_image", decode)
    web_crawl.ingest_folder(root, vocab, out, settings, progress=False)
    whole = tmp_path / "whole"
    web_crawl.ingest_folder(root, vocab, whole, settings, progress=False)
    assert images_of(out) == images_of(whole)
