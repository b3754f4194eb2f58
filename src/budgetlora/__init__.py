"""budgetlora: LoRA fine-tuning of text-classification encoders under a hard parameter budget.

The commands as Python functions (:mod:`budgetlora.api`), one keyword per flag::

    import budgetlora
    run = budgetlora.train(model="roberta-base", data="fancyzhx/ag_news", lora_r=8, output="runs/qv")
"""

import sys
import types

from budgetlora.api import Page, Run, distill, evaluate, export, plan, predict, resolve_config, shift, train

__version__ = "0.1.0"

__all__ = [
    "__version__", "Page", "Run", "resolve_config", "train", "distill", "plan", "evaluate", "predict", "shift", "export",
]  # fmt: skip


class _Package(types.ModuleType):
    """budgetlora's functions share their names with the modules that hold the work
    (budgetlora.train the function, budgetlora.train the module): importing such a module keeps
    the function at the top (``from budgetlora.train import ...`` still reads the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
