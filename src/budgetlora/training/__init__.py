"""Training within the budget: the loop and its checkpoints, losses, adaptation to unlabelled
texts (TAPT, self-training), distillation, and sweeps."""
