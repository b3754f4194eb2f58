"""Exact trainable-parameter accounting, the budget check, and the largest rank that fits."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from budgetlora.config import ModelConfig
from budgetlora.errors import BudgetloraError, OverBudgetError
from budgetlora.modeling import build_model, role_of

__all__ = ["Budget", "count_trainable", "check_budget", "resolve_rank", "measure"]


@dataclass(frozen=True)
class Budget:
    """Trainable parameters by group (``lora.query``, ``head``, ``bias``, ...) against a limit."""

    limit: int
    groups: dict[str, int]

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def fits(self) -> bool:
        return self.trainable <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.limit,
            "trainable": self.trainable,
            "fits": self.fits,
            "groups": dict(self.groups),
        }

    def table(self) -> str:
        """A plain-text table for the terminal."""
        width = max([len(g) for g in self.groups] + [len("trainable")])
        lines = [f"{'group':<{width}}  {'params':>11}  {'of budget':>9}"]
        for group, n in self.groups.items():
            lines.append(f"{group:<{width}}  {n:>11,}  {n / self.limit:>9.1%}")
        lines.append(f"{'trainable':<{width}}  {self.trainable:>11,}  {self.trainable / self.limit:>9.1%}")
        verdict = "fits" if self.fits else f"OVER by {self.trainable - self.limit:,}"
        lines.append(f"{'budget':<{width}}  {self.limit:>11,}  {verdict:>9}")
        return "\n".join(lines)


def _group_of(param_name: str) -> str:
    if "modules_to_save" in param_name:
        return "head"
    if ".lora_" in param_name:
        module = param_name.split(".lora_")[0]
        return "lora." + (role_of(module) or module.rsplit(".", 1)[-1])
    if param_name.endswith("bias"):
        return "bias"
    return "other"


def count_trainable(model: nn.Module, limit: int) -> Budget:
    """Group every parameter with ``requires_grad`` (the exact set the optimizer trains)."""
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = _group_of(name)
            groups[group] = groups.get(group, 0) + param.numel()
    order = sorted(groups, key=lambda g: (not g.startswith("lora."), g != "head", g))
    return Budget(limit=limit, groups={g: groups[g] for g in order})


def measure(cfg: ModelConfig, label_names: Sequence[str], limit: int, rank: int | None = None) -> Budget:
    """Count a configuration on its weightless skeleton (milliseconds, no weights read)."""
    return count_trainable(build_model(cfg, label_names, weights=False, rank=rank), limit)


def resolve_rank(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> int:
    """The largest uniform LoRA rank for ``cfg``'s targets and head that fits ``limit``.

    Parameters grow linearly in the rank (rank_pattern entries aside), so two skeleton
    counts give the cost of one rank unit and the fixed part.
    """
    at1 = measure(cfg, label_names, limit, rank=1).trainable
    at2 = measure(cfg, label_names, limit, rank=2).trainable
    per_rank, fixed = at2 - at1, 2 * at1 - at2
    if per_rank <= 0:
        raise BudgetloraError("lora.r: 'auto' needs LoRA target modules that grow with the rank")
    best = (limit - fixed) // per_rank
    if best < 1:
        raise OverBudgetError(
            f"no LoRA rank fits the budget of {limit:,}: the head and other trainable parts alone "
            f"take {fixed + per_rank:,} at rank 1. Try --head linear or fewer target modules."
        )
    return int(best)


def _suggestion(cfg: ModelConfig, label_names: Sequence[str], limit: int) -> str:
    tips = []
    try:
        rank = resolve_rank(cfg, label_names, limit)
        tips.append(f"--lora-r {rank} (the largest rank that fits these targets and head)")
    except OverBudgetError:
        pass
    if cfg.head == "default":
        linear = replace(cfg, head="linear")
        with contextlib.suppress(BudgetloraError):
            tips.append(f"--head linear with --lora-r {resolve_rank(linear, label_names, limit)}")
    return "; or ".join(tips) if tips else "fewer target modules or layers (see `budgetlora plan`)"


def check_budget(budget: Budget, cfg: ModelConfig, label_names: Sequence[str]) -> None:
    """Raise :class:`OverBudgetError` with the breakdown and what would fit."""
    if budget.fits:
        return
    raise OverBudgetError(
        f"over budget: {budget.trainable:,} trainable parameters > budget {budget.limit:,}\n"
        f"{budget.table()}\n"
        f"would fit: {_suggestion(cfg, label_names, budget.limit)}"
    )
