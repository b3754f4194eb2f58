"""The one exception type a user can cause: the CLI prints its message and exits with code 2."""

from __future__ import annotations

__all__ = ["BudgetloraError", "OverBudgetError", "ExportCheckError"]


class BudgetloraError(Exception):
    """A problem with the user's input (file, option, config) that they can fix."""

    exit_code = 2


class OverBudgetError(BudgetloraError):
    """The configuration trains more parameters than the budget allows."""


class ExportCheckError(BudgetloraError):
    """An exported model that does not reproduce the run's own logits (nothing is written)."""

    exit_code = 1
