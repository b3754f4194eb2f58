"""The package's modules form layers that follow the flow: beneath everything the errors, the run
folder, the config and the runtime; then data -> model -> reporting -> inference -> training ->
the API and the CLI on top. Each module imports only modules before it here (lazy imports
inside functions count), so a sub-package never reaches back up and a module can be read
knowing only what is under it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import budgetlora

# Bottom to top, a group a sub-package (the first holds the modules beneath all of them).
LAYERS = (
    ("errors", "rundir", "config", "runtime"),
    ("data.formats", "data.tables", "data.augment", "data.batching"),
    ("model.roles", "model.methods", "model.modeling", "model.budget", "model.plan"),
    ("reporting.metrics", "reporting.estimate", "reporting.report"),
    (
        "inference.merged", "inference.shift", "inference.backends", "inference.export",
        "inference.predict", "inference.serve",
    ),
    (
        "training.losses", "training.checkpoint", "training.tapt", "training.selftrain",
        "training.train", "training.distill", "training.sweep",
    ),
    ("api", "cli", "__main__"),
)  # fmt: skip
ORDER = tuple(module for layer in LAYERS for module in layer)
PACKAGE = Path(budgetlora.__file__).parent


def _qualified(module: str, names: list[str]) -> set[str]:
    """What ``from budgetlora[.module] import names`` reads: the modules among the names, or
    the module itself."""
    prefix = f"{module}." if module else ""
    modules = {prefix + name for name in names if prefix + name in ORDER}
    return modules or ({module} if module else set())


def imported_modules(path: Path) -> set[str]:
    """The budgetlora modules (dotted below the package) a source file imports, at the top or
    inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "budgetlora":
            found |= _qualified(node.module.partition(".")[2], [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.partition(".")[2] for a in node.names if a.name.startswith("budgetlora."))
    return found


def package_modules() -> set[str]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }


def _source(module: str) -> Path:
    return PACKAGE / (module.replace(".", "/") + ".py")


def test_every_module_has_a_place_and_imports_only_below_it() -> None:
    assert package_modules() == set(ORDER), "place new modules in LAYERS (and drop removed ones)"
    upward = {
        module: sorted(
            dep
            for dep in imported_modules(_source(module))
            if dep not in ORDER or ORDER.index(dep) >= ORDER.index(module)
        )
        for module in ORDER
    }
    assert {m: deps for m, deps in upward.items() if deps} == {}


def test_sub_packages_import_nothing_at_their_top() -> None:
    for layer in LAYERS[1:-1]:
        init = PACKAGE / layer[0].split(".")[0] / "__init__.py"
        assert imported_modules(init) == set(), init


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from budgetlora.config import RunConfig\n"
        "import budgetlora.data.tables\n"
        "from budgetlora.reporting import metrics\n"
        "from budgetlora import errors\n"
        "def later():\n"
        "    from budgetlora.training.train import train\n"
        "    import numpy\n"
    )
    assert imported_modules(source) == {
        "config",
        "data.tables",
        "reporting.metrics",
        "errors",
        "training.train",
    }


def test_every_public_name_exists() -> None:
    for name in ORDER[:-1]:  # __main__ runs the CLI when imported
        module = importlib.import_module(f"budgetlora.{name}")
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert module.__all__ and not missing, (name, missing)
