"""Self-training on unlabelled texts of the target domain (``self_training.*`` with
``data.unlabelled``).

Round 0 is a run of the config without the unlabelled texts (or ``self_training.labeller``, a
finished run). In round r of R the run of round r - 1 labels the unlabelled texts; the most
confident r/R x ``share`` of them (as many of each class, with ``balance``) join the training
rows, and a fresh model trains on both, within the same budget (the rows change, the model
does not). Rounds before the last are run folders of their own under
``RUN/self-training/round-<r>``; the last is ``RUN`` itself. A finished round is not trained
again, and an interrupted one resumes with ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from budgetlora.config import RunConfig
from budgetlora.data.tables import TextTable, read_unlabelled
from budgetlora.errors import BudgetloraError
from budgetlora.inference.merged import load_run
from budgetlora.reporting.metrics import softmax
from budgetlora.reporting.report import md_table
from budgetlora.rundir import RunFolder, check_output, check_run_dir, is_finished, write_json_atomic

__all__ = ["select_pseudo_labels", "self_train"]


def select_pseudo_labels(probs: np.ndarray, count: int, *, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """The rows to pseudo-label and their labels: the ``count`` rows of highest top-class
    probability, or with ``balance`` the ``count // k`` most confident rows predicted as each
    class (fewer for a class predicted less often). probs: (m, k). Returns (rows, labels),
    rows in ascending order."""
    probs = np.asarray(probs)
    labels, confidence = probs.argmax(axis=1), probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    if balance:
        each = count // probs.shape[1]
        chosen = np.concatenate([order[labels[order] == c][:each] for c in range(probs.shape[1])])
    else:
        chosen = order[:count]
    rows = np.sort(chosen)
    return rows, labels[rows]


def _label(
    run_dir: Path, unlabelled: TextTable, count: int, balance: bool, r: int
) -> tuple[TextTable, dict[str, Any]]:
    """Round ``r``'s pseudo-labelled rows, labelled by the run in ``run_dir``, and what was chosen."""
    run = load_run(run_dir)
    probs = softmax(run.logits(unlabelled.texts, progress=True))
    rows, labels = select_pseudo_labels(probs, count, balance=balance)
    names = run.label_names
    assert unlabelled.rows is not None
    table = TextTable(
        texts=[unlabelled.texts[i] for i in rows],
        labels=labels,
        ids=None,
        label_names=names,
        source=unlabelled.source,
        rows=unlabelled.rows[rows],
    )
    confidence = probs.max(axis=1)[rows]
    info = {
        "round": r,
        "labelled_by": str(run_dir),
        "rows": int(len(rows)),
        "per_class": {name: int((labels == c).sum()) for c, name in enumerate(names)},
        "lowest_confidence": float(confidence.min()) if len(rows) else None,
        "mean_confidence": float(confidence.mean()) if len(rows) else None,
    }
    return table, info


def _notes(rounds: list[dict[str, Any]], unlabelled: int) -> dict[str, str]:
    rows = [
        [r["round"], r["labelled_by"], f"{r['rows']:,}", ", ".join(f"{k} {v:,}" for k, v in r["per_class"].items()),
         f"{r['lowest_confidence']:.3f}" if r["lowest_confidence"] is not None else "-"]
        for r in rounds
    ]  # fmt: skip
    table = md_table(
        ["round", "labelled by", "pseudo-labelled", "per class", "lowest confidence"], rows, "llrlr"
    )
    return {"Self-training": f"Of {unlabelled:,} unlabelled texts:\n\n{table}"}


def self_train(
    cfg: RunConfig, train: Callable[..., Any], *, overwrite: bool = False, resume: bool = False
) -> Any:
    """Run every round of ``cfg.self_training`` (see the module docstring), each by
    ``train(cfg, overwrite=, resume=, extra_rows=, notes=)`` (:func:`budgetlora.training.train.train`,
    which calls this); returns the last round's result."""

    def train_round(round_cfg: RunConfig, extra_rows: TextTable | None, notes: dict[str, str]) -> Any:
        resume_round = resume and Path(round_cfg.output).is_dir()
        return train(round_cfg, overwrite=overwrite, resume=resume_round, extra_rows=extra_rows, notes=notes)

    settings = cfg.self_training
    run_dir = Path(cfg.output)
    folder = RunFolder(run_dir)
    check_output(run_dir, overwrite, resume)
    unlabelled = read_unlabelled(cfg.data)
    if len(unlabelled) < len(cfg.data.label_names or ()) or not len(unlabelled):
        raise BudgetloraError(
            f"data.unlabelled {cfg.data.unlabelled}: {len(unlabelled)} rows, too few to pseudo-label"
        )
    # Round 0 and the rounds before the last are plain runs (with their pseudo-labelled rows);
    # the last has the whole config, and with it the shift report of the unlabelled texts.
    plain = replace(cfg, data=replace(cfg.data, unlabelled=None), self_training=replace(settings, rounds=0))
    if settings.labeller is not None:
        teacher = Path(settings.labeller)
        check_run_dir(teacher)
        if not is_finished(teacher):
            raise BudgetloraError(f"self_training.labeller {teacher} has not finished training")
    else:
        teacher = folder.round(0).path
        if overwrite or not is_finished(teacher):
            print(
                f"self-training round 0 of {settings.rounds}: the model without the unlabelled texts",
                flush=True,
            )
            train_round(replace(plain, output=str(teacher)), None, {})
    rounds: list[dict[str, Any]] = []
    labeller = teacher
    result = None
    for r in range(1, settings.rounds + 1):
        count = round(settings.share * r / settings.rounds * len(unlabelled))
        pseudo, info = _label(labeller, unlabelled, count, settings.balance, r)
        rounds.append(info)
        write_json_atomic(folder.rounds, rounds)
        last = r == settings.rounds
        output = run_dir if last else folder.round(r).path
        print(
            f"self-training round {r} of {settings.rounds}: {info['rows']:,} pseudo-labelled rows join the "
            f"training rows ({output})",
            flush=True,
        )
        if last or overwrite or not is_finished(output):
            notes = _notes(rounds, len(unlabelled)) if last else {}
            result = train_round(replace(cfg if last else plain, output=str(output)), pseudo, notes)
        labeller = output
    return result
