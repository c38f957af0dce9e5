"""The architecture holds: import-linter contracts, file sizes, and how much is typed as ``Any``.

These run in ``make test`` (and so in CI) so that a change that breaks the layout fails
there, not only in ``make lint``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpinfer"
MAX_FILE_LINES = 400
MAX_ANY_ANNOTATIONS = 150
"""Parameter and return annotations in ``dpinfer/`` that name ``Any`` (304 before the re-layout)."""


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _names_any(annotation: ast.expr) -> bool:
    return any(
        (isinstance(node, ast.Name) and node.id == "Any")
        or (isinstance(node, ast.Attribute) and node.attr == "Any")
        for node in ast.walk(annotation)
    )


def any_annotations(path: Path) -> int:
    """Annotations of every parameter and return value in ``path`` that name ``Any``."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            annotations = [p.annotation for p in params if p is not None and p.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
            count += sum(_names_any(a) for a in annotations)
    return count


def test_import_contracts_are_kept() -> None:
    """Layers, no cycles, no torch in the hub or the SDK, no test fixture in the product."""
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint_imports).exists():
        pytest.fail("lint-imports is missing: `make install` installs import-linter (the dev extra)")
    run = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"import-linter contracts broken:\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout and "4 kept" in run.stdout, run.stdout


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"split these modules (over {MAX_FILE_LINES} lines): {long}"


def test_any_stays_the_exception() -> None:
    counts = {str(p.relative_to(ROOT)): n for p in _modules() if (n := any_annotations(p))}
    total = sum(counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    assert total <= MAX_ANY_ANNOTATIONS, (
        f"{total} annotations name Any (limit {MAX_ANY_ANNOTATIONS}); most: {worst}"
    )


def test_the_counter_counts_what_it_says(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import Any\ndef f(a: Any, b: int, *c: list[Any]) -> dict[str, Any]: ...\n")
    assert any_annotations(probe) == 3


def documented_files() -> set[str]:
    """The ``dpinfer/`` files of the annotated tree in docs/architecture.md (one line each)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Files", 1)[1].split("```")[1]
    stack: list[str] = []
    files: set[str] = set()
    for line in block.splitlines():
        if not line.strip() or "·" in line:
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        elif name.endswith(".py"):
            files.add("/".join([*stack, name]))
    return {f for f in files if f.startswith("dpinfer/")}


def test_the_documented_tree_is_the_tree() -> None:
    """Every module has its line in docs/architecture.md (a package's line stands for its __init__)."""
    actual = {str(p.relative_to(ROOT)) for p in _modules() if p.name != "__init__.py" or p.parent == PACKAGE}
    documented = documented_files()
    assert not actual - documented, f"add to docs/architecture.md: {sorted(actual - documented)}"
    assert not documented - actual, f"gone, remove from docs/architecture.md: {sorted(documented - actual)}"


def test_every_package_says_its_role_and_what_it_may_import() -> None:
    missing = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if "may import" not in doc.lower():
            missing.append(str(init.relative_to(ROOT)))
    assert not missing, f"these package docstrings must state the role and what it may import: {missing}"
