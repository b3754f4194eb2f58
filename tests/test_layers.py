"""The package's modules form layers: each imports only modules below it in the flow
data -> model -> runtime -> train -> distill/sweep -> CLI (inference beside training), so
that a module can be read knowing only what is under it. Lazy imports inside functions count."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import budgetlora

# Bottom to top: a module may import only modules before it here.
ORDER = (
    "errors",
    "rundir",
    "config",
    "formats",
    "data",
    "augment",
    "losses",
    "metrics",
    "estimate",
    "roles",
    "methods",
    "modeling",
    "budget",
    "runtime",
    "batching",
    "checkpoint",
    "tapt",
    "inference",
    "report",
    "shift",
    "backends",
    "plan",
    "export",
    "predict",
    "selftrain",
    "serve",
    "train",
    "distill",
    "sweep",
    "api",
    "cli",
    "__main__",
)
PACKAGE = Path(budgetlora.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The budgetlora modules a source file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("budgetlora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "budgetlora":
            found.update(alias.name for alias in node.names if alias.name in ORDER)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("budgetlora."))
    return found


def test_every_module_has_a_place_and_imports_only_below_it() -> None:
    modules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert modules == set(ORDER), "place new modules in ORDER (and drop removed ones)"
    upward = {
        module: sorted(
            dep
            for dep in imported_modules(PACKAGE / f"{module}.py")
            if ORDER.index(dep) >= ORDER.index(module)
        )
        for module in ORDER
    }
    assert {m: deps for m, deps in upward.items() if deps} == {}


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from budgetlora.config import RunConfig\n"
        "import budgetlora.data\n"
        "from budgetlora import metrics\n"
        "def later():\n"
        "    from budgetlora.train import train\n"
        "    import numpy\n"
    )
    assert imported_modules(source) == {"config", "data", "metrics", "train"}


def test_every_public_name_exists() -> None:
    for name in ORDER[:-1]:  # __main__ runs the CLI when imported
        module = importlib.import_module(f"budgetlora.{name}")
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert module.__all__ and not missing, (name, missing)
