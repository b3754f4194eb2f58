"""The shift report: how the texts to be scored differ from a run's training rows, what the
model does on them, and the accuracy to expect there without labels.

:func:`analyse` compares a table of texts with the run's own splits (read again from its
config): sizes and token lengths, repeated texts and texts shared with the training rows, a
domain classifier (TF-IDF + logistic regression, cross-validated) that tells the two apart,
the model's predicted class shares and confidences, and the estimators of
:mod:`budgetlora.reporting.estimate` fitted on the validation rows. :func:`write_shift` writes it as
``shift.json``, ``shift.md`` with its plots, and ``shift_rows.csv`` (one row per text);
:func:`shift` does both for ``budgetlora shift``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from budgetlora.data.batching import encode
from budgetlora.data.tables import Splits, TextTable, load_splits, read_table
from budgetlora.errors import BudgetloraError, option
from budgetlora.inference.merged import LoadedRun, check_batch_size, load_run, read_run_config
from budgetlora.reporting.estimate import ESTIMATORS, em_priors, estimate_accuracy, fit_temperature
from budgetlora.reporting.report import figure, md_table, pct, save_png
from budgetlora.rundir import RunFolder, ShiftFolder, check_output_path, write_json_atomic, write_text_atomic
from budgetlora.runtime import writer_lock

__all__ = [
    "LEAD",
    "ESTIMATORS",
    "ShiftReport",
    "analyse",
    "write_shift",
    "shift",
    "domain_classifier",
    "expectation",
    "prior_corrected",
]

LEAD = "class_doc"
"""The estimator the report leads with: the lowest mean error over benchmarks/shift.py's shifts."""
TITLES = {
    "average_confidence": "average confidence (temperature-scaled)",
    "doc": "difference of confidences (DoC)",
    "atc": "average thresholded confidence (ATC)",
    "class_doc": "DoC class by class, EM-reweighted priors",
}
_MAX_VALIDATION = 5_000  # validation rows scored to fit the estimators (a seeded sample beyond)
_MAX_DOMAIN_ROWS = 20_000  # rows of each side the domain classifier is fitted on
_UNLIKE_QUANTILE = 0.95  # "unlike the training texts": scored above 95% of the training rows
_WORDS = 12  # words listed on each side


@dataclass
class ShiftReport:
    """What :func:`analyse` found: ``summary`` is plain JSON, ``rows`` one value per text."""

    summary: dict[str, Any]
    rows: dict[str, np.ndarray]
    """domain_score, unlike, label, confidence, in_training, repeated: each (m,)."""
    ids: list[str]
    label_names: tuple[str, ...]
    val_confidence: np.ndarray
    """(n,) calibrated top-class probability of each validation row scored (for the plot)."""
    train_domain_scores: np.ndarray
    """(r,) out-of-fold domain scores of the training rows the classifier saw (for the plot)."""

    def lines(self) -> list[str]:
        """The summary in a few plain sentences (printed by ``predict`` and ``shift``)."""
        return _summary_lines(self.summary, self.label_names)


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def _length_summary(full_lengths: np.ndarray, max_length: int) -> dict[str, float]:
    lengths = np.asarray(full_lengths, dtype=np.float64)
    return {
        "median_tokens": float(np.median(lengths)),
        "mean_tokens": float(lengths.mean()),
        "p95_tokens": float(np.quantile(lengths, 0.95)),
        "truncated": float((lengths > max_length).mean()),
    }


def domain_classifier(
    reference: list[str], target: list[str], *, seed: int = 0, max_rows: int = _MAX_DOMAIN_ROWS
) -> dict[str, Any]:
    """How well TF-IDF + logistic regression tells ``target`` texts from ``reference`` texts.

    Fitted on at most ``max_rows`` of each side (seeded samples), 5-fold cross-validated:
    each row it saw is scored by the fold that did not train on it. Returns {"auc",
    "target_scores" (m,) P(target) of every target row, "reference_scores" (r,) of the
    reference rows it saw, "target_words", "reference_words" (the words that weigh most
    towards each side)}. Case is kept: lowercased text is itself a shift.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(seed)
    ref_rows = np.sort(rng.permutation(len(reference))[:max_rows])
    target_rows = np.sort(rng.permutation(len(target))[:max_rows])
    texts = [reference[i] for i in ref_rows] + [target[i] for i in target_rows]
    sides = np.r_[np.zeros(len(ref_rows), dtype=int), np.ones(len(target_rows), dtype=int)]
    model = make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=False, max_features=200_000
        ),
        LogisticRegression(max_iter=2000, class_weight="balanced"),
    )
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, texts, sides, cv=folds, method="predict_proba")[:, 1]
    model.fit(texts, sides)
    target_scores = model.predict_proba(target)[:, 1]
    target_scores[target_rows] = scores[len(ref_rows) :]  # out-of-fold where the classifier saw the row
    vocabulary = model[0].get_feature_names_out()
    weights = model[1].coef_[0]
    order = np.argsort(weights)
    return {
        "auc": float(roc_auc_score(sides, scores)),
        "target_scores": target_scores,
        "reference_scores": scores[: len(ref_rows)],
        "target_words": [str(vocabulary[i]) for i in order[::-1][:_WORDS]],
        "reference_words": [str(vocabulary[i]) for i in order[:_WORDS]],
        "fitted_rows": {"reference": int(len(ref_rows)), "target": int(len(target_rows))},
    }


def analyse(
    run: LoadedRun,
    texts: list[str],
    *,
    source: str,
    ids: list[str] | None = None,
    logits: np.ndarray | None = None,
    batch_size: int | None = None,
) -> ShiftReport:
    """Compare ``texts`` with the training rows of ``run`` (see the module docstring).

    ``logits`` (m, k): the run's logits of ``texts`` where the caller has them already.
    """
    cfg = run.cfg
    splits = load_splits(cfg.data, training=False)
    overlap, repeated, in_training = _overlap(texts, splits)
    domain = domain_classifier(splits.train.texts, texts)
    unlike_above = float(np.quantile(domain["reference_scores"], _UNLIKE_QUANTILE))
    unlike = domain["target_scores"] > unlike_above
    scored = _score(run, texts, splits, logits, batch_size)
    summary = {
        "source": source,
        "run": str(cfg.output),
        "rows": len(texts),
        "training_rows": len(splits.train),
        "validation_rows_scored": len(scored.val_probs),
        "max_length": cfg.data.max_length,
        "tokens": _tokens(run, splits.train.texts, texts),
        **overlap,
        "domain": _domain_summary(domain, unlike, unlike_above),
        "model": _model_summary(scored, run.label_names),
        "accuracy": {**scored.estimates, "lead": LEAD},
    }
    return ShiftReport(
        summary=summary,
        rows={
            "domain_score": domain["target_scores"],
            "unlike": unlike,
            "label": scored.probs.argmax(axis=1),
            "confidence": scored.probs.max(axis=1),
            "in_training": in_training,
            "repeated": repeated,
        },
        ids=ids if ids is not None else [str(i) for i in range(len(texts))],
        label_names=run.label_names,
        val_confidence=scored.val_probs.max(axis=1),
        train_domain_scores=domain["reference_scores"],
    )


def _tokens(run: LoadedRun, training: list[str], texts: list[str]) -> dict[str, dict[str, float]]:
    """Token lengths of the training rows and of ``texts``, before truncation."""
    max_length = run.cfg.data.max_length
    return {
        side: _length_summary(encode(rows, None, run.tokenizer, max_length).full_lengths, max_length)
        for side, rows in (("training", training), ("data", texts))
    }


def _overlap(texts: list[str], splits: Splits) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Texts repeated among ``texts`` and texts of the training and validation rows, compared
    with case and spacing ignored: the counts, and (m,) flags repeated and in_training."""
    keys = [_normalised(t) for t in texts]
    counts = Counter(keys)
    train_keys = {_normalised(t) for t in splits.train.texts}
    val_keys = {_normalised(t) for t in splits.validation.texts}
    repeated = np.array([counts[key] > 1 for key in keys])
    in_training = np.array([key in train_keys for key in keys])
    summary = {
        "repeated_rows": int(repeated.sum()),
        "repeated_texts": sum(1 for c in counts.values() if c > 1),
        "shared_with_training": int(in_training.sum()),
        "shared_with_validation": sum(key in val_keys for key in keys),
    }
    return summary, repeated, in_training


def _domain_summary(domain: dict[str, Any], unlike: np.ndarray, threshold: float) -> dict[str, Any]:
    """The report's account of :func:`domain_classifier`."""
    return {
        "method": "TF-IDF (words and word pairs, case kept) + logistic regression, 5-fold cross-validated",
        "roc_auc": domain["auc"],
        "unlike_training": float(unlike.mean()),
        "unlike_threshold": threshold,
        "fitted_rows": domain["fitted_rows"],
        "data_words": domain["target_words"],
        "training_words": domain["reference_words"],
    }


@dataclass
class _Scored:
    """The model on the texts and on the validation rows, calibrated on the validation rows."""

    estimates: dict[str, Any]
    """:func:`budgetlora.reporting.estimate.estimate_accuracy` of the texts."""
    train_prior: np.ndarray
    """(k,) class shares of the training rows."""
    probs: np.ndarray
    """(m, k) temperature-scaled probabilities of the texts."""
    val_probs: np.ndarray
    """(n, k) the same of the validation rows scored."""


def _score(
    run: LoadedRun, texts: list[str], splits: Splits, logits: np.ndarray | None, batch_size: int | None
) -> _Scored:
    """Score the validation rows and ``texts`` (unless their ``logits`` are given), and estimate
    the accuracy on ``texts``."""
    from scipy.special import softmax

    validation, val_logits = _validation_logits(run, splits.validation, batch_size)
    assert validation.labels is not None
    if logits is None:
        logits = run.logits(texts, batch_size=batch_size, progress=True)
    train_prior = _training_prior(splits, len(run.label_names))
    estimates = estimate_accuracy(val_logits, validation.labels, logits, train_prior)
    temperature = estimates["temperature"]
    return _Scored(
        estimates=estimates,
        train_prior=train_prior,
        probs=softmax(logits / temperature, axis=1),
        val_probs=softmax(val_logits / temperature, axis=1),
    )


def _model_summary(scored: _Scored, names: tuple[str, ...]) -> dict[str, Any]:
    """Predicted class shares, EM's re-estimated priors and confidences, against the training
    rows and the validation rows."""
    from scipy.stats import ks_2samp

    val_conf, conf = scored.val_probs.max(axis=1), scored.probs.max(axis=1)
    em_prior, _ = em_priors(scored.probs, scored.train_prior)
    predicted = np.bincount(scored.probs.argmax(axis=1), minlength=len(names)) / len(conf)
    test = ks_2samp(val_conf, conf)
    return {
        "training_prior": dict(zip(names, map(float, scored.train_prior), strict=True)),
        "predicted_shares": dict(zip(names, map(float, predicted), strict=True)),
        "em_prior": dict(zip(names, map(float, em_prior), strict=True)),
        "confidence": {
            "validation_mean": float(val_conf.mean()),
            "data_mean": float(conf.mean()),
            "validation_median": float(np.median(val_conf)),
            "data_median": float(np.median(conf)),
            "ks_statistic": float(test.statistic),
            "ks_pvalue": float(test.pvalue),
        },
    }


def _training_prior(splits: Splits, k: int) -> np.ndarray:
    """(k,) the class shares of the training rows."""
    assert splits.train.labels is not None
    return np.bincount(splits.train.labels, minlength=k) / len(splits.train)


def _validation_logits(
    run: LoadedRun, validation: TextTable, batch_size: int | None
) -> tuple[TextTable, np.ndarray]:
    """The validation rows the estimators are fitted on (a seeded sample of at most 5,000) and their logits."""
    if len(validation) > _MAX_VALIDATION:
        rows = np.sort(np.random.default_rng(0).permutation(len(validation))[:_MAX_VALIDATION])
        validation = validation.select(rows)
    return validation, run.logits(validation.texts, batch_size=batch_size)


def prior_corrected(
    run: LoadedRun, logits: np.ndarray, *, batch_size: int | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """Class probabilities of ``logits`` (m, k) under the class priors that EM re-estimates on
    them (:func:`budgetlora.reporting.estimate.em_priors`), calibrated by the temperature fitted on the
    run's validation rows. Returns (probabilities (m, k), the re-estimated prior of each class)."""
    from scipy.special import softmax

    splits = load_splits(run.cfg.data, training=False)
    validation, val_logits = _validation_logits(run, splits.validation, batch_size)
    assert validation.labels is not None
    temperature = fit_temperature(val_logits, validation.labels)
    prior, adjusted = em_priors(
        softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1),
        _training_prior(splits, len(run.label_names)),
    )
    return adjusted, dict(zip(run.label_names, map(float, prior), strict=True))


def _points(x: float) -> str:
    return f"{abs(100 * x):.1f} point{'s' if abs(round(100 * x, 1)) != 1 else ''}"


def expectation(accuracy: dict[str, Any]) -> str:
    """The one sentence the report leads with: the lead estimator against validation."""
    lead = accuracy["estimates"][accuracy["lead"]]
    gap = lead["estimate"] - accuracy["validation"]
    where = "above" if gap > 0 else "below"
    return (
        f"expect about {100 * lead['estimate']:.0f}% accuracy on these texts "
        f"(95% interval {100 * lead['low']:.0f}-{100 * lead['high']:.0f}%), {_points(gap)} {where} "
        f"validation ({100 * accuracy['validation']:.1f}% on {accuracy['n_validation']:,} rows)"
    )


def _summary_lines(s: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    tokens, domain, model = s["tokens"], s["domain"], s["model"]
    conf = model["confidence"]
    beyond = "beyond chance" if conf["ks_pvalue"] < 0.01 else "within chance"
    shares = ", ".join(
        f"{name} {100 * model['predicted_shares'][name]:.0f}% ({100 * model['training_prior'][name]:.0f}%)"
        for name in names
    )
    return [
        f"shift of {s['source']} ({s['rows']:,} rows) from the {s['training_rows']:,} training rows of {s['run']}:",
        f"  length: median {tokens['data']['median_tokens']:.0f} tokens (training {tokens['training']['median_tokens']:.0f}); "
        f"{100 * tokens['data']['truncated']:.1f}% cut at {s['max_length']} tokens (training {100 * tokens['training']['truncated']:.1f}%)",
        f"  repeats: {s['repeated_rows']:,} rows repeat a text of the data; {s['shared_with_training']:,} are training texts",
        f"  domain: a TF-IDF classifier tells them from the training texts with ROC AUC {domain['roc_auc']:.2f} "
        f"(0.5: no shift); {100 * domain['unlike_training']:.0f}% of rows look unlike the training texts "
        f"(5% would by chance)",
        f"  model: mean confidence {100 * conf['data_mean']:.1f}% here, {100 * conf['validation_mean']:.1f}% on validation "
        f"({beyond}, KS D = {conf['ks_statistic']:.2f}); predicted classes (training): {shares}",
        f"  {expectation(s['accuracy'])}",
    ]


def _rows_csv(report: ShiftReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "ID",
            "domain_score",
            "unlike_training",
            "Label",
            "label_name",
            "confidence",
            "in_training",
            "repeated",
        ]
    )
    r = report.rows
    for i, row_id in enumerate(report.ids):
        writer.writerow([
            row_id, f"{r['domain_score'][i]:.4f}", int(r["unlike"][i]), int(r["label"][i]),
            report.label_names[int(r["label"][i])], f"{r['confidence'][i]:.4f}", int(r["in_training"][i]),
            int(r["repeated"][i]),
        ])  # fmt: skip
    return buffer.getvalue()


def _plot_confidence(path: Path, validation: np.ndarray, data: np.ndarray) -> Path:
    return _plot_scores(
        path,
        (validation, "validation"),
        data,
        xlabel="Top-class probability (temperature-scaled)",
        title="Model confidence",
        legend_at="upper left",
    )


def _plot_domain(path: Path, training: np.ndarray, data: np.ndarray, threshold: float) -> Path:
    return _plot_scores(
        path,
        (training, "training texts"),
        data,
        xlabel="Domain score: P(these texts | text), out of fold",
        title="Domain classifier",
        legend_at="upper center",
        threshold=threshold,
    )


def _plot_scores(
    path: Path,
    reference: tuple[np.ndarray, str],
    data: np.ndarray,
    *,
    xlabel: str,
    title: str,
    legend_at: Literal["upper left", "upper center"],
    threshold: float | None = None,
) -> Path:
    """Density histograms over 0..1 of the ``reference`` side's values (named) and of these
    texts' ``data``, with the ``threshold`` of "unlike the training texts" marked where given."""
    fig = figure(7.0)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41).tolist()
    for values, label, color in ((*reference, "#4c72b0"), (data, "these texts", "#dd8452")):
        ax.hist(
            values, bins=bins, density=True, alpha=0.55, color=color, label=f"{label} (n = {len(values):,})"
        )
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label="above 95% of the training texts")
    ax.set(xlabel=xlabel, ylabel="Density", title=title)
    ax.legend(loc=legend_at)
    return save_png(fig, path)


def _markdown(report: ShiftReport) -> str:

    s, names = report.summary, report.label_names
    tokens, domain, model, accuracy = s["tokens"], s["domain"], s["model"], s["accuracy"]
    token_rows = [
        [
            label,
            f"{t['median_tokens']:.0f}",
            f"{t['mean_tokens']:.1f}",
            f"{t['p95_tokens']:.0f}",
            pct(t["truncated"]),
        ]
        for label, t in (("training rows", tokens["training"]), ("these texts", tokens["data"]))
    ]
    class_rows = [
        [
            name,
            pct(model["training_prior"][name]),
            pct(model["predicted_shares"][name]),
            pct(model["em_prior"][name]),
        ]
        for name in names
    ]
    estimate_rows = [["validation accuracy (labelled)", pct(accuracy["validation"]), "", ""]] + [
        [
            TITLES[name] + (" (lead)" if name == accuracy["lead"] else ""),
            pct(e["estimate"]), pct(e["low"]), pct(e["high"]),
        ]
        for name, e in accuracy["estimates"].items()
    ]  # fmt: skip
    conf = model["confidence"]
    return "\n\n".join([
        f"# Shift report: {s['source']}",
        f"**{expectation(accuracy)[0].upper()}{expectation(accuracy)[1:]}.**",
        f"{s['rows']:,} texts against the {s['training_rows']:,} training rows of `{s['run']}`; the estimators "
        f"are fitted on {s['validation_rows_scored']:,} validation rows. Per-row scores: `shift_rows.csv`.",
        "## Accuracy to expect (no labels)",
        md_table(["estimate", "accuracy", "95% low", "95% high"], estimate_rows, "lrrr"),
        f"Temperature fitted on validation: {accuracy['temperature']:.2f}. Intervals: bootstrap over the "
        "validation rows and these texts together.",
        "## Texts",
        md_table(["", "median tokens", "mean tokens", "95th percentile", f"cut at {s['max_length']}"], token_rows, "lrrrr"),
        f"{s['repeated_rows']:,} rows repeat a text of the data ({s['repeated_texts']:,} texts repeated); "
        f"{s['shared_with_training']:,} rows are texts of the training rows and {s['shared_with_validation']:,} "
        "of the validation rows.",
        "## Domain classifier",
        f"{domain['method']}: ROC AUC **{domain['roc_auc']:.3f}** (0.5: indistinguishable). "
        f"{pct(domain['unlike_training'])} of these texts score above 95% of the training rows (5% would by chance).",
        "![domain scores](shift_domain.png)",
        "Words that weigh towards these texts: " + ", ".join(f"`{w}`" for w in domain["data_words"]) + ".\n\n"
        "Words that weigh towards the training texts: " + ", ".join(f"`{w}`" for w in domain["training_words"]) + ".",
        "## The model on these texts",
        md_table(["class", "training rows", "predicted here", "EM re-estimate"], class_rows, "lrrr"),
        f"Mean confidence {pct(conf['data_mean'])} here against {pct(conf['validation_mean'])} on validation "
        f"(two-sample Kolmogorov-Smirnov D = {conf['ks_statistic']:.3f}, "
        f"{'beyond' if conf['ks_pvalue'] < 0.01 else 'within'} chance).",
        "![confidence](shift_confidence.png)",
    ]) + "\n"  # fmt: skip


def write_shift(report: ShiftReport, folder: Path) -> list[Path]:
    """``shift.json``, ``shift.md``, ``shift_rows.csv`` and the plots, into ``folder``."""

    folder.mkdir(parents=True, exist_ok=True)
    files = ShiftFolder(folder)
    written = [
        _plot_confidence(files.confidence_plot, report.val_confidence, report.rows["confidence"]),
        _plot_domain(
            files.domain_plot,
            report.train_domain_scores,
            report.rows["domain_score"],
            report.summary["domain"]["unlike_threshold"],
        ),
    ]
    write_text_atomic(files.rows, _rows_csv(report))
    write_text_atomic(files.report, _markdown(report))
    write_json_atomic(files.summary, report.summary)
    return [*written, files.rows, files.report, files.summary]


def shift(
    run_dir: str | Path,
    data: str | Path,
    *,
    output: str | Path | None = None,
    text_column: str = "text",
    allow_pickle: bool = False,
    model: str | None = None,
    batch_size: int | None = None,
) -> ShiftReport:
    """The shift report of ``data`` against the run's training rows, written into ``output``.

    Args:
        run_dir: a finished run folder (from budgetlora train)
        data: file of texts (any input predict reads)
        output: output folder (default RUN_DIR/shift-<DATA's name>)
        text_column: text column name
        allow_pickle: allow a pickled input (unpickling runs code: trusted files only)
        model: base model folder or Hub id, if not the one recorded in the run
        batch_size: samples per inference batch (default 256 on a GPU, 16 on a CPU)
    """

    check_batch_size(batch_size)
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, model)
    out = Path(output) if output is not None else RunFolder(run_dir).shift_of(data)
    check_output_path(out, option("output"), folder=True)
    table = read_table(data, text_column=text_column, require_labels=False, allow_pickle=allow_pickle)
    if len(table) < 10:
        raise BudgetloraError(f"{data}: {len(table)} rows; a shift report needs at least 10")
    with writer_lock(out):
        run = load_run(run_dir, cfg=cfg)
        report = analyse(run, table.texts, source=str(data), ids=table.ids, batch_size=batch_size)
        if run.runtime.is_main_process:
            write_shift(report, out)
    return report
