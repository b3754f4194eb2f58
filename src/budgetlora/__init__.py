"""budgetlora: LoRA fine-tuning of text-classification encoders under a hard parameter budget.

The commands as Python functions (:mod:`budgetlora.api`), one keyword per flag::

    import budgetlora
    run = budgetlora.train(model="roberta-base", data="fancyzhx/ag_news", lora_r=8, output="runs/qv")
"""

from budgetlora.api import Page, Run, distill, evaluate, export, plan, predict, resolve_config, shift, train

__version__ = "0.1.0"

__all__ = [
    "__version__", "Page", "Run", "resolve_config", "train", "distill", "plan", "evaluate", "predict", "shift", "export",
]  # fmt: skip
