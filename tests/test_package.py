"""The built wheel, installed into a fresh environment, runs from any folder: the configs ship
inside the package, every command has a console script, and ``--version`` is usam's."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import venv
from importlib.metadata import version
from pathlib import Path

import pytest

import usam
from usam.__main__ import COMMANDS

from helpers.commands import ROOT


def _run(*args: str | Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["USAM_CACHE"] = str(cwd / "cache")  # the tiny models built on first use
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the usam wheel; the pinned dependencies come from this environment."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ROOT,
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        root / "dist",
        cwd=root,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((root / "dist").glob("usam-*.whl"))
    env_dir = root / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    (Path(site.stdout.strip()) / "usam_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    install = _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "-q",
        wheel,
        cwd=root,
    )
    assert install.returncode == 0, install.stderr
    return env_dir / "bin"


def test_the_installed_package_is_the_wheel_not_the_source_tree(installed, tmp_path):
    found = _run(installed / "python", "-c", "import usam; print(usam.__file__)", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(installed.parent)


def test_version_is_usams(installed, tmp_path):
    for command in (
        [installed / "usam", "--version"],
        [installed / "python", "-m", "usam", "--version"],
        [installed / "usam-fit", "--version"],
    ):
        shown = _run(*command, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == f"usam {usam.__version__}"


def test_every_command_has_a_console_script(installed):
    for name in COMMANDS:
        assert (installed / f"usam-{name}").is_file(), name


def test_the_demo_composes_and_its_first_step_runs_from_a_temporary_folder(installed, tmp_path):
    job = _run(installed / "usam-fit", "experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "_target_: usam.data.datamodule.ShardDataModule" in job.stdout
    generated = _run(
        installed / "usam-generate",
        "generate=tiny",
        "data.classes=[cat,dog]",
        "generate.per_class=1",
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    image_set = Path(generated.stdout.strip().splitlines()[-1])
    assert image_set.is_relative_to(tmp_path) and (image_set / "manifest.json").is_file()


def test_the_wheel_ships_every_sweep_file_as_written(installed, tmp_path):
    """``usam.sweep <name>`` reads the installed package's copies: all of them, unchanged."""
    listing = (
        "import json; from usam.sweep import PACKAGED; "
        "print(json.dumps({p.name: p.read_text() for p in PACKAGED.glob('*.yaml')}))"
    )
    shipped = _run(installed / "python", "-c", listing, cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr
    source = {p.name: p.read_text() for p in (ROOT / "src" / "usam" / "sweeps").glob("*.yaml")}
    assert len(source) == 6 and json.loads(shipped.stdout) == source


def test_the_public_api_resolves_and_a_wrong_name_says_so():
    """Each name the README offers is the object of that name where the layout puts it."""
    readme = (ROOT / "README.md").read_text()
    offered = readme.split("from usam import ")[1].split("\n")[0].split(", ")
    also = re.split(r"\.\s", readme.split("`from usam import ...` also offers")[1], maxsplit=1)
    offered += re.findall(r"`(\w+)`", also[0])
    assert sorted(usam.__all__) == sorted(["__version__", *offered])
    defined_in = {
        "usam.inference.annotator": ["Annotator"],
        "usam.inference.predictor": ["Predictor", "InferenceSettings", "load_head"],
        "usam.sam.amg_settings": ["AmgSettings"],
        "usam.sam.sam1_backend": ["AutomaticMaskEngine"],
        "usam.sam.registry": ["SamSettings", "build_sam", "build_engine"],
        "usam.core.vocabulary": ["load_vocabulary"],
        "usam.data.datamodule": ["ShardDataModule"],
        "usam.train.head": ["MaskClassifierHead"],
        "usam.train.lightning_modules": ["TeacherModule", "StudentModule"],
    }
    for module, names in defined_in.items():
        for name in names:
            found = getattr(usam, name)
            assert (found.__module__, found.__qualname__) == (module, name)
            assert found is getattr(importlib.import_module(module), name)
    assert sum(map(len, defined_in.values())) == len(usam.__all__) - 1
    assert usam.__version__ == version("usam")
    with pytest.raises(AttributeError, match="no attribute 'Annotater'"):
        _ = usam.Annotater
