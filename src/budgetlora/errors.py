"""The one exception type a user can cause (the CLI prints its message and exits with code 2),
and how a message names an option.

A message names an option by its config key (``model.lora.r``), or by its parameter's name
where it is no config key (``output`` of ``evaluate``), marked by :func:`option`; a value for it
is written by :func:`setting`. Each front end shows a marked option in its own words through
:func:`name_options`: the CLI as its flag (``--lora-r 8``), the Python API as its keyword
(``lora_r=8``); read as is, the message shows the key (```model.lora.r`=8``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "BudgetloraError",
    "OverBudgetError",
    "ExportCheckError",
    "option",
    "setting",
    "settings_text",
    "name_options",
]

# A marked option: a key or name between backticks, and the "=" of a setting when it follows.
_MARKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`(=?)")


def option(name: str) -> str:
    """An option named in a message: ``option("model.lora.r")`` -> ```model.lora.r```."""
    return f"`{name}`"


def setting(name: str, value: Any) -> str:
    """An option with a value in a message: ``setting("model.lora.r", 8)`` -> ```model.lora.r`=8``
    (a list of values is written comma-separated, as the CLI takes it)."""
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"{option(name)}={shown}"


def name_options(text: str, name: Callable[[str], str], assign: str = "=") -> str:
    """``text`` with each marked option replaced by ``name(key)``, and each setting's ``=`` by ``assign``."""
    return _MARKED.sub(lambda m: name(m.group(1)) + (assign if m.group(2) else ""), text)


def settings_text(values: dict[str, Any]) -> str:
    """Several settings (key -> value), space-separated, in their order."""
    return " ".join(setting(key, value) for key, value in values.items())


class BudgetloraError(Exception):
    """A problem with the user's input (file, option, config) that they can fix."""

    exit_code = 2


class OverBudgetError(BudgetloraError):
    """The configuration trains more parameters than the budget allows."""


class ExportCheckError(BudgetloraError):
    """An exported model that does not reproduce the run's own logits (nothing is written)."""

    exit_code = 1
