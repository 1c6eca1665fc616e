"""The package's shape, read from its source with ``ast`` so that it cannot silently erode.

- Stage order (docs/architecture.md): a module imports only from its own stage or one
  above it in ``STAGES``; the commands, their entries and the shared command modules
  (``usam.cli``, ``usam.sweep``, ...) sit on top and may import any stage.
- ``usam.testing`` (tiny models, synthetic shards, the official-generator oracle) may
  import any stage but no command; a stage imports it only where a user-facing tiny
  option needs it (``TESTING_USERS``).
- Every module is at most ``MAX_MODULE_LINES`` long, and every function longer than
  ``MAX_FUNCTION_LINES`` says in its docstring why it is one piece ("Long because ...").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "usam"
STAGES = (
    "core",
    "formats",
    "viz",
    "sam",
    "images",
    "data",
    "train",
    "inference",
    "evaluation",
    "review",
    "serving",
)
TESTING = "testing"
COMMANDS = len(STAGES)  # the rank of everything that is neither a stage nor usam.testing
# stage module -> the usam.testing module its user-facing option builds from
TESTING_USERS = {
    "usam.images.stable_diffusion": "usam.testing.tiny_diffusion",  # generate=tiny
    "usam.data.datamodule": "usam.testing.synthetic",  # data=synthetic
    "usam.evaluation.sam3_baseline": "usam.testing.tiny_sam3",  # baseline.sam3.model=tiny
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
REASON = re.compile(r"\bLong because\b")


def _modules() -> dict[str, tuple[ast.Module, int]]:
    """Module name -> (its syntax tree, its line count)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = path.read_text()
        found[name] = (ast.parse(source, filename=str(path)), len(source.splitlines()))
    return found


SOURCES = _modules()
MODULES = {name: tree for name, (tree, _) in SOURCES.items()}


def _part(module: str) -> str | None:
    """The subpackage of ``usam.<part>...``; None for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and _is_package(f"usam.{parts[1]}") else None


def _rank(module: str) -> int:
    part = _part(module)
    return STAGES.index(part) if part in STAGES else COMMANDS


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every usam module ``name`` imports, at module level or inside a function."""
    package = name if name in MODULES and _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return {module for module in found if module == "usam" or module.startswith("usam.")}


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def test_the_package_tree_is_what_the_rules_name():
    """A new subpackage needs a place in the stage order before the other checks mean
    anything for it."""
    parts = {_part(name) for name in MODULES} - {None}
    assert parts == {*STAGES, TESTING, "commands"}, "add the new subpackage to STAGES"
    for user, testing in TESTING_USERS.items():
        assert user in MODULES and testing in MODULES


def test_imports_point_only_down_the_stage_order():
    upward = []
    for name, tree in MODULES.items():
        if _part(name) == TESTING:
            continue
        for target in _imports(name, tree):
            if _part(target) == TESTING:
                if TESTING_USERS.get(name) != target:
                    upward.append(f"{name} imports {target}, test machinery")
            elif _rank(target) > _rank(name):
                upward.append(f"{name} ({_part(name)}) imports {target}, a later stage")
    assert not upward, "\n".join(upward)


def test_test_machinery_imports_no_command():
    found = [
        f"{name} imports {target}"
        for name, tree in MODULES.items()
        if _part(name) == TESTING
        for target in _imports(name, tree)
        if _part(target) != TESTING and _rank(target) == COMMANDS
    ]
    assert not found, "\n".join(found)


def test_the_checks_see_an_upward_import():
    """The rules catch what they are for: a stage importing a later one or the tests' tools."""
    tree = ast.parse(
        "from usam.train.head import MaskClassifierHead\n"
        "def build():\n    from usam.testing import agreement\n"
    )
    assert _imports("usam.sam.registry", tree) == {"usam.train.head", "usam.testing.agreement"}
    assert _rank("usam.train.head") > _rank("usam.sam.registry")
    assert _rank("usam.cli") == COMMANDS and _rank("usam.commands.fit") == COMMANDS


def test_modules_stay_short():
    long = {name: lines for name, (_, lines) in SOURCES.items() if lines > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines; split them: {long}"


def test_long_functions_say_why_in_their_docstring():
    unexplained = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and not REASON.search(ast.get_docstring(node) or "")
    ]
    assert not unexplained, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them, or say in the docstring "
        "'Long because ...':\n" + "\n".join(unexplained)
    )
