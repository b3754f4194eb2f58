"""mkdocs hook: links from docs/ to files of the repository outside docs/.

A page may link to a benchmark's results or to CONTRIBUTING.md with a relative link
(``../benchmarks/README.md``) so that the link works where the markdown is read on its own (a
GitHub checkout). The site holds docs/ only, so such a link would point nowhere there: this hook
shows it as its repository path instead. A link to a file that does not exist is left alone, so
that mkdocs reports it and ``mkdocs build --strict`` fails.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_target(target: str, page_dir: Path, docs_dir: Path, repo: Path) -> str | None:
    """The repository path of ``target`` when it is a relative link to an existing file or folder
    of the repository outside docs/, else None."""
    if "://" in target or target.startswith(("#", "/", "mailto:")):
        return None
    path = (page_dir / target.split("#", 1)[0]).resolve()
    if path.is_relative_to(docs_dir) or not path.is_relative_to(repo) or not path.exists():
        return None
    return path.relative_to(repo).as_posix()


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    repo = Path(config["config_file_path"]).resolve().parent
    page_dir = Path(page.file.abs_src_path).resolve().parent

    def replace(match: re.Match[str]) -> str:
        repo_path = _outside_target(match["target"], page_dir, docs_dir, repo)
        if repo_path is None:
            return match[0]
        text = match["text"]
        return text if repo_path in text else f"{text} (`{repo_path}`)"

    lines, in_fence = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        lines.append(line if in_fence else _LINK.sub(replace, line))
    return "\n".join(lines)
