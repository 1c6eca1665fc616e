"""The READMEs' commands, run for real. Every shell command of README.md and
experiments/README.md (and the method table's), read at test time, runs from an empty
folder with only the changes of one table (helpers/readme_table.py) standing in for
weights, the network and GPUs, and must leave what the README says next to it. A command
that is neither run nor listed there with its reason fails the suite."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from usam.core.vocabulary import load_vocabulary

from helpers.evaluation import write_voc
from helpers.official_amg import photo_folder
from helpers.readme_commands import (
    Command,
    command_line,
    expected_writes,
    fast,
    fill,
    not_run_reason,
    overrides,
    placeholder_pattern,
    printed_checkpoint,
    producer,
    readme_commands,
    runnable,
    variables_of,
)
from helpers.readme_table import (
    ADDED,
    CONTINUES,
    EXPECT,
    FAST,
    NOT_RUN,
    PRODUCED,
    SETUP,
    SWAPS,
    VARIABLES,
    VARIANTS,
    WRITTEN_AS,
)
from helpers.web_server import local_server, reply

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = readme_commands(ROOT)
INPUTS = ("voc", "coco", "photos", "class_tree", "voc_urls", "coco_urls", "server", "home")
TIMEOUT = 900  # seconds, a generous bound for the slowest command (the sweep's six fits)


def _jobs():
    for command in filter(runnable, COMMANDS):
        marks = () if fast(command) else (pytest.mark.slow,)
        yield pytest.param(command, (), id=command.id, marks=marks)
        for pattern, (extra, _) in VARIANTS.items():
            if re.search(pattern, command.text):
                name = f"{command.id}+{'+'.join(extra)}"
                yield pytest.param(command, extra, id=name, marks=(pytest.mark.slow,))


# ---------------------------------------------------------------- the stand-ins


def _photo(name: str, size=(192, 144)) -> bytes:
    """A smooth random JPEG, the same for the same name and unlike any other's dHash."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _Api(BaseHTTPRequestHandler):
    """Images at /img/<name>.jpg and, in their documented shapes, Openverse's and Wikimedia
    Commons' searches: three CC0 hits per query, on one page."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        base = f"http://127.0.0.1:{self.server.server_address[1]}/img/"
        if parts.path == "/robots.txt":
            return reply(self, 200, "text/plain", b"User-agent: *\nAllow: /\n")
        if parts.path.startswith("/img/"):
            return reply(self, 200, "image/jpeg", _photo(parts.path))
        search = query.get("q") or query.get("gsrsearch", "").removesuffix(" filetype:bitmap")
        slug = re.sub(r"\W+", "-", search)
        names = [f"{slug}-{i}" for i in range(3)]
        if parts.path == "/openverse/images/":
            results = [
                {"url": f"{base}{n}.jpg", "license": "cc0", "title": n, "creator": "test"}
                for n in names
            ]
            payload = {"result_count": 3, "page_count": 1, "page": 1, "results": results}
        else:
            payload = {
                "batchcomplete": True,
                "query": {"pages": [_commons(base, i, n) for i, n in enumerate(names, start=1)]},
            }
        reply(self, 200, "application/json", json.dumps(payload).encode())


def _commons(base: str, number: int, name: str) -> dict:
    info = {
        "url": f"{base}{name}.jpg",
        "descriptionurl": f"https://commons.example/wiki/File:{name}.jpg",
        "width": 192,
        "height": 144,
        "mime": "image/jpeg",
        "extmetadata": {"LicenseShortName": {"value": "CC0"}, "License": {"value": "cc0"}},
    }
    return {"pageid": number, "index": number, "title": f"File:{name}.jpg", "imageinfo": [info]}


def _url_list(path: Path, vocabulary: str, server: str) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "class"])
        for name in load_vocabulary(vocabulary).classes:
            slug = name.replace(" ", "-")
            writer.writerows([f"{server}/img/{vocabulary}-{slug}-{i}.jpg", name] for i in range(2))
    return str(path)


def _coco(root: Path) -> str:
    """COCO's layout: val2017/ and annotations/instances_val2017.json, the 80 classes, two
    images with a person and a dog (polygons)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    names = load_vocabulary("coco80").classes
    images, annotations = [], []
    for number in (1, 2):
        file_name = f"{number:012d}.jpg"
        Image.open(io.BytesIO(_photo(file_name, (64, 48)))).save(root / "val2017" / file_name)
        images.append({"id": number, "file_name": file_name, "width": 64, "height": 48})
        for category, box in ((1, (4, 4, 30, 40)), (names.index("dog") + 1, (34, 10, 60, 44))):
            x0, y0, x1, y1 = box
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": category,
                    "segmentation": [polygon],
                    "area": (x1 - x0) * (y1 - y0),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    return str(root)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """What the table's ``{name}``s stand for: small data sets, photos, URL lists, a
    loopback server and the session's home and model cache."""
    root = tmp_path_factory.mktemp("inputs")
    tree = root / "tree"
    for name in ("cat", "dog"):
        (tree / name).mkdir(parents=True)
        for i in range(2):
            (tree / name / f"{name}{i}.jpg").write_bytes(_photo(f"tree-{name}-{i}"))
    with local_server(_Api) as server:
        yield {
            "voc": str(write_voc(root / "VOCdevkit" / "VOC2012")),
            "coco": _coco(root / "coco"),
            "photos": str(photo_folder(root / "photos")),
            "class_tree": str(tree),
            "voc_urls": _url_list(root / "voc20_urls.csv", "voc20", server),
            "coco_urls": _url_list(root / "coco80_urls.csv", "coco80", server),
            "server": server,
            "home": str(root / "home"),
            "cache": str(root / "cache"),
        }


# ---------------------------------------------------------------- running them


@dataclass
class Run:
    argv: list[str]
    folder: Path
    returncode: int
    printed: str  # stdout, then stderr


@dataclass
class Runs:
    """Each command line run once per module (the fit run the student, annotate and eval
    commands read is shared), from a folder of its own."""

    root: Path
    inputs: dict[str, str]
    done: dict[tuple, Run] = field(default_factory=dict)

    def run(self, command: Command, extra: tuple[str, ...] = ()) -> tuple[Run, list[str]]:
        """The run of ``command`` and what it found wrong with the README's placeholders."""
        tokens, problems = list(command.tokens), []
        for index, token in enumerate(tokens):
            for produced in PRODUCED:
                if found := re.fullmatch(produced.token, token):
                    value, problem = self._produce(command, produced, found.group(1))
                    tokens[index] = token[: found.start(1)] + value + token[found.end(1) :]
                    problems += [problem] if problem else []
                    break
        argv = command_line(tuple(tokens), self.inputs, extra)
        continued = [
            self.run(producer(command, rule.producer, COMMANDS))[0]
            for rule in CONTINUES
            if re.search(rule.pattern, command.text)
        ]
        for prior in continued:
            assert prior.returncode == 0, _failure(command, prior, "the run it continues failed")
        key = (tuple(argv), *(str(prior.folder) for prior in continued))
        if key not in self.done:
            self.done[key] = self._start(command, argv, continued)
        return self.done[key], problems

    def _produce(self, command: Command, produced, placeholder: str) -> tuple[str, str | None]:
        """A placeholder's value from the run of the command that makes it, and the
        problem when the README's path names no file of that run."""
        source = producer(command, produced.producer, COMMANDS)
        made, _ = self.run(source)
        assert made.returncode == 0, _failure(source, made, f"{command.id} reads its output")
        if produced.source != "path":
            path = printed_checkpoint(made.printed, produced.source)
            assert path, f"{source.id} printed no {produced.source} checkpoint:\n{made.printed}"
            return str(path), None
        pattern = placeholder_pattern(placeholder, overrides(made.argv)["sam"])
        written = sorted(p.relative_to(made.folder).as_posix() for p in made.folder.rglob("*.ckpt"))
        named = [path for path in written if pattern.fullmatch(path)]
        if named:
            return str(made.folder / named[0]), None
        stage = "student" if "/student/" in placeholder else "teacher"
        return str(printed_checkpoint(made.printed, stage)), (
            f"the README's {placeholder} names no file that {source.id} wrote ({written}); "
            f"run with the {stage} checkpoint it tested"
        )

    def _start(self, command: Command, argv: list[str], continued: list[Run]) -> Run:
        folder = Path(tempfile.mkdtemp(prefix=re.sub(r"\W+", "-", command.id), dir=self.root))
        for prior in continued:
            shutil.copytree(prior.folder / "data", folder / "data", dirs_exist_ok=True)
        for setup in SETUP:
            if re.search(setup.pattern, command.text):
                made, target = Path(self.inputs[setup.input]), folder / fill(setup.at, self.inputs)
                if made.is_dir():
                    shutil.copytree(made, target, dirs_exist_ok=True)
                else:
                    shutil.copyfile(made, target)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            HOME=self.inputs["home"],
            USAM_CACHE=self.inputs["cache"],
            OMP_NUM_THREADS="1",
            WANDB_MODE="offline",
            HF_HUB_OFFLINE="1",
        )
        done = subprocess.run(
            argv, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        return Run(argv, folder, done.returncode, done.stdout + done.stderr)


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> Runs:
    Path(inputs["home"]).mkdir(exist_ok=True)
    return Runs(tmp_path_factory.mktemp("runs"), inputs)


def _failure(command: Command, run: Run, why: str) -> str:
    tail = "\n".join(run.printed.splitlines()[-40:])
    return (
        f"{why}: {command.id} ({command.text})\nran {shlex.join(run.argv)} in {run.folder}\n"
        f"exit code {run.returncode}; its last lines:\n{tail}"
    )


def _missing(command: Command, run: Run) -> list[str]:
    """What the README says the command leaves that the run did not."""
    values = overrides(run.argv)
    patterns = {k: re.escape(v) for k, v in values.items()}
    text, missing = " ".join(run.argv), []
    for expect in (e for e in EXPECT if re.search(e.pattern, text)):
        for pattern in expect.files:
            where = os.path.join(run.folder, fill(pattern, values))
            if not glob.glob(where):
                missing.append(f"no {fill(pattern, values)} ({expect.reason})")
        for line in expect.printed:
            if not re.search(fill(line, patterns), run.printed, re.MULTILINE):
                missing.append(f"no printed line /{fill(line, patterns)}/ ({expect.reason})")
        for path in expect.absent:
            if (run.folder / path).exists():
                missing.append(f"{path} was written ({expect.reason})")
    for pattern in expected_writes(command):
        if not glob.glob(
            os.path.join(run.folder, pattern) + ("*" if pattern.endswith("/") else "")
        ):
            missing.append(f"no {pattern}, which the method table says it writes")
    return missing


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize(("command", "extra"), list(_jobs()))
def test_readme_command(command: Command, extra: tuple[str, ...], runs: Runs):
    run, problems = runs.run(command, extra)
    assert run.returncode == 0, _failure(command, run, "the command failed")
    problems += _missing(command, run)
    if "Traceback (most recent call last)" in run.printed:
        problems.append("it printed a traceback")
    assert not problems, _failure(command, run, "\n".join(problems))


def test_every_command_is_run_or_listed():
    unknown = [c.id for c in COMMANDS if not runnable(c) and not_run_reason(c) is None]
    assert not unknown, f"README commands neither run nor listed in NOT_RUN: {unknown}"
    exported = {c.tokens[1].split("=")[0] for c in COMMANDS if c.tokens[0] == "export"}
    placeholders = {p.token for p in PRODUCED}
    for command in filter(runnable, COMMANDS):
        for name in variables_of(command):
            made = any(f"\\${name}" in token for token in placeholders)
            assert name in VARIABLES or made, f"{command.id} reads ${name}: give it a stand-in"
    assert exported <= set(VARIABLES), exported - set(VARIABLES)


def test_every_table_entry_is_used():
    """An entry no README command needs any more is a change the table makes for nothing."""
    dummy = {name: f"<{name}>" for name in INPUTS}
    run = [c for c in COMMANDS if runnable(c)]
    texts = [c.text for c in COMMANDS] + [" ".join(command_line(c.tokens, dummy)) for c in run]
    tokens = [token for c in run for token in c.tokens]
    entries = {  # kind: its patterns, and where each must find something
        "NOT_RUN": (list(NOT_RUN), texts),
        "ADDED": ([a.pattern for a in ADDED], texts),
        "SETUP": ([s.pattern for s in SETUP], texts),
        "CONTINUES": ([r for c in CONTINUES for r in (c.pattern, c.producer)], texts),
        "PRODUCED": ([p.producer for p in PRODUCED], texts),
        "VARIANTS": (list(VARIANTS), texts),
        "FAST": (list(FAST), texts),
        "EXPECT": ([e.pattern for e in EXPECT], texts),
        "WRITTEN_AS": ([w for w, _, _ in WRITTEN_AS], [p for c in run for p in c.writes]),
        "SWAPS": ([f"^(?:{s.token})$" for s in SWAPS], tokens),
        "PRODUCED tokens": ([f"^(?:{p.token})$" for p in PRODUCED], tokens),
    }
    unused = [
        (kind, pattern)
        for kind, (patterns, where) in entries.items()
        for pattern in patterns
        if not any(re.search(pattern, text) for text in where)
    ]
    assert not unused, unused


def test_console_scripts_and_modules_named_in_the_readme_both_answer():
    """`usam-<command>` and `python -m usam.<command>`, found on the PATH of the venv the
    suite runs in, print the same help."""
    scripts = sorted(set(re.findall(r"`(usam-\w+)`", (ROOT / "README.md").read_text())))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == sorted(set(declared) - {"usam"})  # every command's script is named
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for script in scripts:
        module = ["python", "-m", script.replace("-", ".")]
        answers = [
            subprocess.run([*way, "--help"], env=env, capture_output=True, text=True, timeout=120)
            for way in ([script], module)
        ]
        assert [a.returncode for a in answers] == [0, 0], answers
        assert answers[0].stdout == answers[1].stdout and answers[0].stdout.strip()
