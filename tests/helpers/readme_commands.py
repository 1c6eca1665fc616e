"""The READMEs' commands, read at test time, and the changes of ``readme_table`` applied.

A command is a line of a ```bash block (continuations joined, comments dropped) or a
``python -m usam...`` cell of the README's method table. Every one is either run, changed
only as this table says, or listed in ``NOT_RUN`` with why.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from helpers.readme_table import ADDED, FAST, NOT_RUN, SWAPS, VARIABLES, WRITTEN_AS

READMES = ("README.md", "experiments/README.md")
METHOD_TABLE = "## The method, step by step"
PROGRAM = re.compile(r"^(python -m usam(\.\w+)?|usam(-\w+)?)( |$)")


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    tokens: tuple[str, ...]  # as the shell splits them: quotes removed, comment dropped
    writes: tuple[str, ...] = ()  # what the method table says the command writes
    part: int = 0  # the method table's second command on one line is part 1

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}" + (f".{self.part}" if self.part else "")


# ---------------------------------------------------------------- reading the READMEs


def readme_commands(root: Path) -> list[Command]:
    """Every command of the READMEs, in the order they appear."""
    commands = []
    for name in READMES:
        lines = (root / name).read_text().splitlines()
        commands += sorted(_shell_commands(name, lines) + _method_table(name, lines), key=_order)
    return commands


def _order(command: Command) -> tuple[int, int]:
    return command.line, command.part


def _shell_commands(name: str, lines: list[str]) -> list[Command]:
    """The lines of ```bash blocks, continuation lines joined onto the first."""
    commands, fence, pending, start = [], None, "", 0
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "bash":
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(pending + line, comments=True)
        if tokens:
            commands.append(Command(name, start, tuple(tokens)))
        pending, start = "", 0
    return commands


def _method_table(name: str, lines: list[str]) -> list[Command]:
    """The method table's commands with the paths its last column says they write. A cell's
    ``key=value`` span after a command is that command with those keys' groups replaced
    (``ingest=folder ingest.root=DIR`` after ``... ingest.urls=urls.csv``)."""
    commands: list[Command] = []
    inside = False
    for number, line in enumerate(lines, start=1):
        if line.startswith("## "):
            inside = line.strip() == METHOD_TABLE
        if not (inside and line.startswith("| ")) or line.startswith("| ---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        writes = tuple(re.findall(r"`([^`]+)`", cells[-1]))
        base: tuple[str, ...] = ()
        for span in re.findall(r"`([^`]+)`", cells[1]):
            tokens = tuple(shlex.split(span))
            if PROGRAM.match(span):
                base = tokens
            elif not (base and all("=" in token for token in tokens)):
                continue
            else:
                groups = {_group(token) for token in tokens}
                kept = [t for t in base[3:] if _group(t) not in groups]
                tokens = (*base[:3], *kept, *tokens)
            part = sum(c.line == number for c in commands)
            commands.append(Command(name, number, tokens, writes, part))
    return commands


def _group(override: str) -> str:
    return re.split(r"[.=]", override.lstrip("+~"), maxsplit=1)[0]


def _key(override: str) -> str | None:
    return override.split("=", 1)[0].lstrip("+~") if "=" in override else None


# ---------------------------------------------------------------- applying the table


def not_run_reason(command: Command) -> str | None:
    """Why the command is not run here, or None when it is."""
    return next((why for rule, why in NOT_RUN.items() if re.search(rule, command.text)), None)


def runnable(command: Command) -> bool:
    return not_run_reason(command) is None and bool(PROGRAM.match(command.text))


def fast(command: Command) -> bool:
    return any(re.search(rule, command.text) for rule in FAST)


def variables_of(command: Command) -> set[str]:
    return {m.group(1) or m.group(2) for m in re.finditer(r"\$(\w+)|\$\{(\w+)\}", command.text)}


def fill(template: str, values: dict[str, str]) -> str:
    """``{name}`` replaced where ``values`` has the name (regex counts like ``{4}`` stay)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def expand(token: str, inputs: dict[str, str]) -> str:
    """The token with its $VARIABLES replaced by their stand-ins (a checkpoint variable
    such as $VOC_STUDENT is PRODUCED's, filled before)."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return fill(VARIABLES[name][0], inputs) if name in VARIABLES else match.group(0)

    return re.sub(r"\$(\w+)|\$\{(\w+)\}", value, token)


def command_line(tokens: tuple[str, ...], inputs: dict[str, str], extra=()) -> list[str]:
    """The command as run here: SWAPS, then the variables, then ADDED and ``extra`` put
    before the first option (Hydra reads no override after ``--cfg job``)."""
    swapped: list[str] = []
    for token in tokens:
        swap = next((s for s in SWAPS if re.fullmatch(s.token, token)), None)
        made = [fill(t, inputs) for t in swap.tokens] if swap else [token]
        swapped += [expand(t, inputs) for t in made]
    text = " ".join(tokens)
    keys = {_key(token) for token in swapped}
    appended: list[str] = []
    for added in ADDED:
        if re.search(added.pattern, text):
            for override in added.overrides:
                if _key(override) not in keys:
                    appended.append(fill(override, inputs))
                    keys.add(_key(override))
    options = [i for i, token in enumerate(swapped) if i > 2 and token.startswith("-")]
    at = options[0] if options else len(swapped)
    return [*swapped[:at], *appended, *extra, *swapped[at:]]


def overrides(argv: list[str]) -> dict[str, str]:
    """``key=value`` of a command line, with the defaults the checks name (the SAM: tiny)."""
    values = {"sam": "tiny"}
    values.update(arg.split("=", 1) for arg in argv if _key(arg))
    return values


def producer(command: Command, pattern: str, commands: list[Command]) -> Command:
    """The command ``pattern`` finds: the nearest before ``command`` in its README, else
    the first in any."""
    earlier = [c for c in commands if c.file == command.file and _order(c) < _order(command)]
    found = [c for c in earlier if re.search(pattern, c.text)][-1:] or [
        c for c in commands if re.search(pattern, c.text)
    ][:1]
    if not found:
        raise LookupError(f"{command.id} depends on a README command /{pattern}/: none is left")
    return found[0]


def placeholder_pattern(path: str, sam: str) -> re.Pattern:
    """A README example path as a pattern of the files a run may have written: ``...``
    reads as any folders, digits as any digits, the SAM in ``outputs/fit/<data>-<sam>`` as
    the run's."""
    parts = []
    for number, part in enumerate(path.split("/")):
        if part == "...":
            parts.append(".+")
            continue
        if number == 2 and path.startswith("outputs/fit/") and "-" in part:
            part = part.split("-", 1)[0] + "-" + sam
        parts.append(re.sub(r"\d+", r"\\d+", re.escape(part)))
    return re.compile("/".join(parts))


def printed_checkpoint(printed: str, stage: str) -> Path | None:
    """The checkpoint fit's last lines give for ``stage`` (``<stage> checkpoint: <path>``)."""
    found = re.search(rf"^{stage} checkpoint: (\S+)$", printed, re.MULTILINE)
    return Path(found.group(1)) if found else None


def expected_writes(command: Command) -> list[str]:
    """The method table's paths as globs: ``<...>`` and ``...`` any, ``{a,b}`` both, a
    bare name inside the path before it, renamed as ``WRITTEN_AS`` says."""
    globs: list[str] = []
    for path in command.writes:
        path = re.sub(r"<[^>]+>|\.\.\.", "*", path)
        for pattern, written, _ in WRITTEN_AS:
            path = re.sub(pattern, written, path)
        if "/" not in path and globs:
            path = f"{globs[0].rstrip('/')}/{path}"
        braces = re.search(r"\{([^}]+)\}", path)
        for choice in braces.group(1).split(",") if braces else [None]:
            globs.append(path.replace(braces.group(0), choice) if braces else path)
    return globs
