"""budgetlora: LoRA fine-tuning of text-classification encoders under a hard parameter budget."""

__version__ = "0.1.0"

__all__ = ["__version__"]
