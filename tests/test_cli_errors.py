"""How the commands fail: every mistake a newcomer makes from an empty folder ends in one
line naming the key, with exit code 2; a bug keeps its traceback, on screen and in the
run's log, and its run folder."""

from __future__ import annotations

import textwrap

import pytest
from hydra.errors import MissingConfigException

from usam.command_errors import MissingKeysError, set_failed_run_aside

from helpers.commands import run_entry, run_python

# (command, its arguments, what the one line must name), one required key left out at a time
MISTAKES = {
    "annotate": [
        (["ckpt=head.ckpt", "out=labelled"], "images"),
        (["images=photos", "out=labelled"], "ckpt"),
        (["images=photos", "ckpt=head.ckpt"], "out"),
        (["images=photos", "ckpt=head.ckpt", "out=labelled", "amg=paperr"], "amg=paperr"),
    ],
    "extract": [
        ([], "source"),
        (["source=folder"], "source.root"),
        (["sam=vit_hh"], "choose one of: vit_h,"),
    ],
    "eval": [
        ([], "eval_data.source"),
        (["eval_data=voc_vall"], "choose one of: voc_val,"),
    ],
    "fit": [
        (["stage=student", "logger=none"], "teacher_ckpt"),
        (["stage=student", "teacher_ckpt=none.ckpt"], "teacher_ckpt=none.ckpt is not a file"),
        (["experiment=nonexistent"], "experiment=nonexistent"),
        (["callbacks=[default,eval]", "logger=none"], "eval_data"),  # after config.yaml
    ],
    "generate": [(["generate=sdd"], "choose one of: sd, tiny")],
    "ingest": [
        ([], "ingest.urls"),
        (["ingest=folder"], "ingest.root"),
        (["ingest=openversee"], "choose one of: openverse,"),
    ],
}


@pytest.mark.parametrize("command", sorted(MISTAKES))
def test_each_mistake_from_an_empty_folder_is_one_line_naming_the_key(command, tmp_path):
    for args, named in MISTAKES[command]:
        folder = tmp_path / "-".join(args or ["bare"])
        folder.mkdir()
        code, stderr = run_entry(command, *args, cwd=folder)
        lines = stderr.strip().splitlines()
        assert code == 2, (args, stderr)
        assert len(lines) == 1 and lines[0].startswith(f"usam.{command}: error: "), stderr
        assert named in lines[0], (args, lines[0])
        assert not (folder / "outputs").exists(), args  # no failed run folder left behind


# (command, a misspelt key on its command line, the key it meant)
MISSPELT = [
    ("annotate", "max_sid=1500", "max_side"),
    ("eval", "inference.confidence_treshold=0.5", "inference.confidence_threshold"),
    ("extract", "extract.images_per_shrd=10", "extract.images_per_shard"),
    ("fit", "amg.point_per_side=16", "amg.points_per_side"),
    ("generate", "generate.per_clas=2", "generate.per_class"),
    ("ingest", "ingest.worker=4", "ingest.workers"),
]


@pytest.mark.parametrize(("command", "override", "meant"), MISSPELT)
def test_a_misspelt_key_is_named_with_the_key_it_meant(command, override, meant, tmp_path):
    """Not Hydra's advice to append it with +, which adds a key nothing reads."""
    code, stderr = run_entry(command, override, cwd=tmp_path)
    misspelt = override.split("=")[0]
    assert code == 2
    assert stderr == f"usam.{command}: error: unknown key {misspelt}; did you mean {meant}\n"
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_key_with_nothing_close_lists_the_keys_of_its_group(tmp_path):
    code, stderr = run_entry("fit", "sam.zzz=1", cwd=tmp_path)
    assert code == 2
    expected = "unknown key sam.zzz; valid keys: model_type, checkpoint, cache_dir"
    assert stderr == f"usam.fit: error: {expected}\n"


def test_a_missing_key_says_what_it_takes_and_verbose_shows_everything(tmp_path):
    code, stderr = run_entry("annotate", "images=photos", "ckpt=head.ckpt", cwd=tmp_path)
    assert code == 2
    assert "out (output folder; reusing it resumes); add out=... to the command" in stderr
    # verbose=true adds the traceback; the exit code stays a user error's
    code, stderr = run_entry(
        "annotate", "images=photos", "ckpt=head.ckpt", "verbose=true", cwd=tmp_path
    )
    assert code == 2 and "Traceback" in stderr and MissingKeysError.__name__ in stderr
    assert stderr.splitlines()[-1].startswith("usam.annotate: error: required key not set: out")
    code, stderr = run_entry("extract", "sam=vit_hh", "verbose=true", cwd=tmp_path)
    assert code == 2 and MissingConfigException.__name__ in stderr and "sam/vit_hh" in stderr
    assert stderr.splitlines()[-1].startswith("usam.extract: error: sam=vit_hh does not exist")


COMMAND_THAT_FAILS = """
import sys
sys.path.insert(0, {folder!r})
sys.argv = ["usam.ingest", *{args!r}]
from usam.cli import hydra_command
hydra_command("ingest", "failing_command")()
"""


def _run_failing_command(tmp_path, raise_line: str, *args: str):
    (tmp_path / "failing_command.py").write_text(
        f"from usam.core.config import ConfigError\n\n\ndef run(cfg):\n    {raise_line}\n"
    )
    script = COMMAND_THAT_FAILS.format(folder=str(tmp_path), args=list(args))
    return run_python("-c", textwrap.dedent(script), cwd=tmp_path, timeout=120)


def test_a_bug_keeps_its_traceback_on_screen_and_in_the_run_log(tmp_path):
    failed = _run_failing_command(tmp_path, "raise RuntimeError('shape (3, 4) vs (4, 3)')")
    assert failed.returncode == 1
    assert "Traceback" in failed.stderr
    assert "RuntimeError: shape (3, 4) vs (4, 3)" in failed.stderr
    (run_dir,) = (tmp_path / "outputs" / "ingest" / "voc").glob("failed-*")
    assert f"the failed run's files are in {run_dir}" in failed.stderr
    log = (run_dir / "ingest.log").read_text()
    assert "usam.ingest failed" in log and "Traceback" in log
    assert "RuntimeError: shape (3, 4) vs (4, 3)" in log


def test_a_user_error_is_one_line_and_leaves_no_run_folder(tmp_path):
    raise_line = "raise ConfigError('ingest.workers=0 must be at least 1')"
    failed = _run_failing_command(tmp_path, raise_line)
    assert failed.returncode == 2
    assert failed.stderr.strip() == "usam.ingest: error: ingest.workers=0 must be at least 1"
    assert not (tmp_path / "outputs").exists()
    loud = _run_failing_command(tmp_path, raise_line, "verbose=true")
    assert loud.returncode == 2 and "Traceback" in loud.stderr
    assert loud.stderr.splitlines()[-1] == "usam.ingest: error: ingest.workers=0 must be at least 1"


def _run_folder(log_dir, *files: str, time: str = "2026-01-01_00-00-00"):
    run_dir = log_dir / "fit" / "voc-tiny" / time
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}")
    (run_dir / "fit.log").write_text("")
    for name in files:  # a name with a suffix is a file, any other a folder
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_text("")
        else:
            path.mkdir()
    return run_dir


def test_a_run_that_wrote_only_its_bookkeeping_is_removed(tmp_path):
    log_dir = tmp_path / "outputs"
    run_dir = _run_folder(log_dir, "config.yaml", "wandb", "checkpoints/teacher")
    assert set_failed_run_aside(run_dir, log_dir, keep=False) is None
    assert not log_dir.exists()


def test_a_run_that_wrote_results_or_a_bug_is_renamed_whole(tmp_path):
    log_dir = tmp_path / "outputs"
    run_dir = _run_folder(log_dir, "config.yaml", "checkpoints/teacher/last.ckpt")
    failed = set_failed_run_aside(run_dir, log_dir, keep=False)
    assert failed == run_dir.with_name(f"failed-{run_dir.name}")
    assert (failed / "checkpoints" / "teacher" / "last.ckpt").is_file()
    bug = _run_folder(log_dir, time="2026-01-01_00-00-01")
    assert set_failed_run_aside(bug, log_dir, keep=True) == bug.with_name(f"failed-{bug.name}")
