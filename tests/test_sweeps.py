from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from usam.formats.embedding_shards import read_manifest
from usam.sweep import PACKAGED, SweepFileError, multirun_overrides, sweep_file
from usam.train.head import INPUT_VIEWS
from usam.train.lightning_modules import StudentModule, TeacherModule

from helpers.commands import ROOT, compose_config
from helpers.shards import SMALL_CLASSES, quiet_trainer, synthetic_datamodule
from helpers.wandb_runs import offline_record

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
README = ROOT / "experiments" / "README.md"
# the shell variables the README's commands read
README_VARIABLES = (
    "VOC",
    "COCO",
    "SAM_CKPT",
    "VOC_URLS",
    "COCO_URLS",
    "VOC_STUDENT",
    "COCO_STUDENT",
    "SUPERCLASS_STUDENT",
    "SAM2_CKPT",
    "SAM3_DIR",
    "VOC_SAM2_STUDENT",
)


def readme_commands() -> list[str]:
    """Every ``python -m usam.<command> ...`` line of the README's bash blocks, joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python -m usam."):
                commands.append(" ".join(line.split()))
    return commands


COMMANDS = readme_commands()


def test_the_paper_ablations_have_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {
        "teacher_top_k",
        "student_uncertainty",
        "head_input_view",
        "student_init",
        "data_source",
        "proposals",
    } <= names


def sweep(stem: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / "sweeps" / f"{stem}.yaml").read_text())


def test_the_ablation_sweeps_cover_every_switch():
    views = sweep("head_input_view")["parameters"]["model.input_view"]["values"]
    assert sorted(views) == sorted(INPUT_VIEWS)
    starts = sweep("student_init")["parameters"]["model.student.init_from_teacher"]["values"]
    assert sorted(starts) == [False, True]


def test_sweeps_select_on_held_out_training_images_never_on_test_data(shard_sets, tmp_path):
    """The metric of every sweep is one the modules log on the val split of the training
    shards (image labels only): a real validation pass of each stage logs it."""
    metrics = {sweep(p.stem)["metric"]["name"] for p in SWEEPS}
    assert metrics == {"val/image_acc"}
    trainer = quiet_trainer(tmp_path)
    teacher = TeacherModule(SMALL_CLASSES, head={"hidden_dims": [16, 16, 16]})
    images = read_manifest(shard_sets["val"]).num_images
    for module in (teacher, StudentModule(dict(teacher.hparams))):
        logged = trainer.validate(module, datamodule=synthetic_datamodule(shard_sets))[0]
        assert metrics <= set(logged)
        right = logged["val/image_acc"] * images  # a share of the images, not of the batches
        assert right == pytest.approx(round(right), abs=1e-4), (right, images)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_files_are_valid_wandb_grids_that_compose(path, tmp_path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["command"][:4] == ["${env}", "python", "-m", "usam.fit"]
    assert sweep["command"][-1] == "${args_no_hyphens}"
    monkeypatch.setenv("USAM_TEACHER_CKPT", str(tmp_path / "teacher.ckpt"))
    overrides = multirun_overrides(sweep, str(path))
    fixed = overrides[: -len(sweep["parameters"])]
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    for key, spec in sweep["parameters"].items():
        for value in spec["values"]:
            cfg = compose_config("fit", [*fixed, f"{key}={value}", *paths])
            if "." in key:  # a value; a bare name is a config group (experiment, proposals)
                assert str(OmegaConf.select(cfg, key)) == str(value)
            assert "eval" in cfg.callbacks and cfg.eval_data.name == "voc_val"
            if "teacher_ckpt" in " ".join(fixed):
                assert cfg.teacher_ckpt == str(tmp_path / "teacher.ckpt")


def test_only_grid_sweeps_translate():
    with pytest.raises(SweepFileError, match="only grid"):
        multirun_overrides({"method": "bayes"}, "x.yaml")
    with pytest.raises(SweepFileError, match="command must run"):
        multirun_overrides({"method": "grid", "command": ["python", "train.py"]}, "x.yaml")


def test_a_two_point_sweep_runs_as_a_hydra_multirun(tmp_path):
    sweep = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.teacher.top_k": {"values": [0.1, 3]}},
        "command": [
            "${env}",
            "python",
            "-m",
            "usam.fit",
            "data=synthetic",
            "stage=teacher",
            "${args_no_hyphens}",
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "usam.sweep",
            str(path),
            "data.classes=[cat,dog]",
            "data.synthetic.images_per_class=4",
            "++trainer.fast_dev_run=true",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,  # where a user starts it: nothing points the paths elsewhere
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "fit" / "multiruns").iterdir()
    jobs = sorted(sweep_dir.glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, top_k in zip(jobs, ("0.1", "3")):
        assert (job / "checkpoints" / "teacher" / "final.ckpt").is_file()
        assert f"top_k: {top_k}" in (job / "config.yaml").read_text()
        # the offline W&B run: named by its swept value, grouped by its sweep, whole config
        markers = (
            f"top_k={top_k}-teacher".encode(),
            f"synthetic-tiny-sweep-{sweep_dir.name}".encode(),
            *(b"model.teacher.top_k", b"data.classes", b"sam:tiny", b"random-weights"),
        )
        record = offline_record(job / "wandb", *markers)
        for marker in markers:
            assert marker in record, marker


def test_the_sweep_command_explains_itself(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "usam.sweep", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "Hydra multirun" in shown.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "usam.sweep", "nowhere.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "usam.sweep: error: no sweep file nowhere.yaml; the sweeps shipped with usam: "
        + ", ".join(p.stem for p in SWEEPS)
    )


def test_a_shipped_sweep_is_found_by_name():
    """Installed users have no experiments/ folder: the sweeps ship inside the package."""
    assert sweep_file("teacher_top_k") == PACKAGED / "teacher_top_k.yaml"
    assert sweep_file(str(SWEEPS[0])) == SWEEPS[0]  # a path still works
    # experiments/sweeps is the packaged folder itself, and the wheel's package data takes
    # every file in it (tests/test_package.py installs the wheel and reads them back)
    assert (ROOT / "experiments" / "sweeps").resolve() == PACKAGED == ROOT / "src/usam/sweeps"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = setuptools["package-data"]["usam"]
    for path in PACKAGED.iterdir():
        relative = str(path.relative_to(PACKAGED.parent))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in shipped), relative
    overrides = multirun_overrides(yaml.safe_load(sweep_file("proposals").read_text()), "x")
    assert overrides[-1] == "proposals=paper,official_filtered"


@pytest.mark.parametrize("command", COMMANDS, ids=[str(i) for i in range(len(COMMANDS))])
def test_every_readme_command_composes(command, tmp_path, monkeypatch):
    """Each override of each command exists: Hydra refuses unknown keys and groups."""
    for name in README_VARIABLES:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    words = shlex.split(os.path.expandvars(command))
    assert not [w for w in words if "$" in w], f"an unset variable in: {command}"
    entry, overrides = words[2].removeprefix("usam."), words[3:]
    if entry == "sweep":
        assert (ROOT / overrides[0]).is_file()
        return
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    cfg = compose_config(entry, [*overrides, *paths])
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if "." in key:  # a value, not a group choice: it must arrive as written
            arrived = OmegaConf.select(cfg, key)
            if OmegaConf.is_config(arrived):
                arrived = OmegaConf.to_container(arrived)
            assert arrived == override.value(), override.input_line


def test_the_readme_has_a_command_for_every_table():
    commands = "\n".join(COMMANDS)
    text = README.read_text()
    assert "Table 3" in text and "Table 1" not in text  # the paper's main comparison
    for wanted in (
        "usam.fit experiment=voc_sd",  # Table 3 U-SAM (VOC), Table 4 SD rows
        "usam.fit experiment=coco_sd",  # Table 3 U-SAM (COCO)
        "usam.eval baseline=sam_clip eval_data=voc_val",  # Table 3 SAM+CLIP
        "usam.eval baseline=sam_clip eval_data=coco_val",
        "usam.fit experiment=voc_wc",  # Table 4 web rows
        "usam.fit experiment=coco_wc",  # the COCO web-crawled row
        "usam.fit experiment=voc_superclasses",  # the superclass result
    ):
        assert wanted in commands, wanted
