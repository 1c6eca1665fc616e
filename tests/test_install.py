"""usam installs into an environment it did not make: pyproject.toml declares ranges,
requirements/lowest.txt pins their lower bounds for the lowest-versions run (`make
test-lowest`), requirements/lock.txt pins the exact stack `make test` runs, and the built wheel
installed beside a torch, torchvision and an older Lightning already there keeps all three and
runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import usam

from helpers.commands import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(line) for line in PROJECT["dependencies"]]
EXTRAS = {  # each extra's own requirements: a reference to another (usam[...]) is not one
    name: [r for r in map(Requirement, lines) if r.name != PROJECT["name"]]
    for name, lines in PROJECT["optional-dependencies"].items()
}


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a requirements file, by canonical name."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = Version(version)
    return found


def lower_bound(requirement: Requirement) -> Version:
    """The ``>=`` version of a range; a range without one is a mistake here."""
    (bound,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return Version(bound)


def test_each_dependency_is_a_range_whose_lower_bound_the_lowest_run_pins():
    lowest = pins(ROOT / "requirements" / "lowest.txt")
    for requirement in RUNTIME + [r for extra in EXTRAS.values() for r in extra]:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators <= {">=", "<"}, f"{requirement}: a range, not a pin"
        lower_bound(requirement)  # raises where the range has no lower bound
    for requirement in RUNTIME:
        name = canonicalize_name(requirement.name)
        assert lowest.get(name) == lower_bound(requirement), name
    bounds = {canonicalize_name(r.name): lower_bound(r) for e in EXTRAS.values() for r in e}
    for name in lowest.keys() - {canonicalize_name(r.name) for r in RUNTIME}:
        assert lowest[name] == bounds.get(name), f"{name}: lowest.txt pins what no range declares"


def test_the_lock_pins_every_dependency_and_extra_inside_its_range():
    locked = pins(ROOT / "requirements" / "lock.txt")
    for requirement in RUNTIME + [r for extra in EXTRAS.values() for r in extra]:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in the lock: run `make lock`"
        assert requirement.specifier.contains(locked[name]), f"lock {locked[name]}: {requirement}"


def test_the_label_studio_sdk_installs_beside_usam():
    """The SDK's own requirements and usam's are met by one environment: cv2 above all, which
    both import."""
    try:
        sdk = metadata.distribution("label-studio-sdk")
    except metadata.PackageNotFoundError:
        pytest.skip("the review extra (label-studio-sdk) is not installed")
    ours = {canonicalize_name(r.name): r for r in RUNTIME}
    shared = []
    for requirement in map(Requirement, sdk.requires or []):
        name = canonicalize_name(requirement.name)
        if name not in ours or (requirement.marker and not requirement.marker.evaluate()):
            continue
        installed = Version(metadata.version(name))
        assert requirement.specifier.contains(installed), f"the SDK needs {requirement}"
        assert ours[name].specifier.contains(installed), f"usam needs {ours[name]}"
        shared.append(name)
    assert "opencv-python-headless" in shared


def _run(*args: str | Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["USAM_CACHE"] = str(cwd / "cache")  # the tiny models built on first use
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def _link_installed(names: list[str], folder: Path) -> None:
    """Links this environment's ``names`` and what they require into ``folder``: the torch an
    image or a cluster already has, without a second multi-GB copy of it."""
    folder.mkdir()
    pending, seen = [canonicalize_name(n) for n in names], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (folder / top).exists():
                (folder / top).symlink_to(site / top)
        for requirement in map(Requirement, dist.requires or []):
            if not requirement.marker or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))


@pytest.mark.slow
def test_the_wheel_keeps_the_torch_and_the_older_lightning_already_installed(tmp_path):
    built = _run(
        sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q",
        "-w", tmp_path / "dist", cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("usam-*.whl"))
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = _run(python, "-c", purelib, cwd=tmp_path)
    _link_installed(["torch", "torchvision"], tmp_path / "preinstalled")
    (Path(site.stdout.strip()) / "preinstalled.pth").write_text(f"{tmp_path / 'preinstalled'}\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    oldest_lightning = str(lower_bound(next(r for r in RUNTIME if r.name == "lightning")))
    assert _run(*pip, f"lightning=={oldest_lightning}", cwd=tmp_path).returncode == 0
    installed = _run(*pip, "--report", tmp_path / "report.json", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    replaced = {canonicalize_name(i["metadata"]["name"]) for i in report["install"]}
    assert replaced.isdisjoint({"torch", "torchvision", "lightning"}), sorted(replaced)
    versions = _run(
        python, "-c",
        "import torch; from importlib.metadata import version; "
        "print(version('torch'), version('torchvision'), version('lightning'), torch.__file__)",
        cwd=tmp_path,
    )  # fmt: skip
    assert versions.returncode == 0, versions.stderr
    torch_version, vision_version, lightning_version, torch_file = versions.stdout.split()
    assert (torch_version, vision_version) == (
        metadata.version("torch"),
        metadata.version("torchvision"),
    )
    assert Path(torch_file).is_relative_to(tmp_path / "preinstalled")
    assert lightning_version == oldest_lightning
    shown = _run(env_dir / "bin" / "usam", "--version", cwd=tmp_path)
    assert shown.stdout.strip() == f"usam {usam.__version__}", shown.stderr
    generated = _run(
        env_dir / "bin" / "usam-generate", "generate=tiny", "data.classes=[cat,dog]",
        "generate.per_class=1", cwd=tmp_path,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    image_set = Path(generated.stdout.strip().splitlines()[-1])
    assert (image_set / "manifest.json").is_file()
