"""`budgetlora export` on the tiny model: the folder that transformers' pipeline loads, the ONNX
graph that onnxruntime runs, both scoring as the run does; bad input refused before any work;
a failed export leaves nothing half-written."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoTokenizer, pipeline

from budgetlora.errors import BudgetloraError, ExportCheckError
from budgetlora.inference.export import _compare, export
from budgetlora.inference.predict import classify, load_run
from budgetlora.reporting.metrics import softmax
from budgetlora.training.train import train
from commands import cli, main_exit
from conftest import make_rows, tiny_model

EXPORT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.onnx",
    "README.md",  # the model card
    "export.json",
}
# Held-out fixture texts, and one past the run's 32-token max length (truncated alike everywhere).
TEXTS = [t for t, _ in make_rows(40, seed=11)] + [
    " ".join(["market shares profit company stocks investors bank quarter sales"] * 6)
]


@pytest.fixture(scope="module")
def trained(tiny_run):  # type: ignore[no-untyped-def]
    return tiny_run


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("exports") / "tiny"
    result = cli("export", str(trained.run_dir), str(out), "--format", "all")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (merged, onnx;" in result.stdout
    return out


def test_export_folder_holds_exactly_the_documented_files(exported: Path, trained) -> None:  # type: ignore[no-untyped-def]
    assert {p.name for p in exported.iterdir()} == EXPORT_FILES
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging left
    info = json.loads((exported / "export.json").read_text())
    assert info["label_names"] == list(trained.cfg.data.label_names)
    assert info["max_length"] == 32 and info["formats"] == ["merged", "onnx"]
    assert info["head"] == "default" and info["onnx"]["opset"] == 18
    assert info["budget"] == json.loads((trained.run_dir / "budget.json").read_text())
    assert info["metrics"]["test"] == {k: trained.metrics["test"][k] for k in ("accuracy", "macro_f1", "n")}
    assert set(info["checks"]) == {"merged_max_logit_diff", "onnx_max_logit_diff"}
    assert all(0 <= v <= 1e-3 for v in info["checks"].values())
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(trained.cfg.data.label_names)}
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 32


def test_transformers_pipeline_agrees_with_budgetlora(exported: Path, trained) -> None:  # type: ignore[no-untyped-def]
    classifier = pipeline("text-classification", model=str(exported), device="cpu")
    got = classifier(TEXTS, top_k=None, truncation=True, batch_size=8)
    expected = classify(trained.run_dir, TEXTS)
    assert [g[0]["label"] for g in got] == [e["label"] for e in expected]
    for scores, row in zip(got, expected, strict=True):
        assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in scores} == row["probabilities"]
    # The run learned the task: the pipeline's labels are right, not only equal.
    truth = [f"label_{y}" for _, y in make_rows(40, seed=11)]
    assert np.mean([g[0]["label"] == y for g, y in zip(got, truth, strict=False)]) > 0.9


def test_onnxruntime_agrees_with_budgetlora(exported: Path, trained) -> None:  # type: ignore[no-untyped-def]
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    tokenizer = AutoTokenizer.from_pretrained(exported)
    # One padded batch of every text (the mask matters), and single rows (no padding).
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="np")
    assert batch["input_ids"].shape[1] == 32
    (logits,) = session.run(
        ["logits"],
        {
            "input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64),
        },
    )
    reference = load_run(trained.run_dir, mixed_precision="no").logits(TEXTS, use_cache=False)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    for i in (0, len(TEXTS) - 1):
        one = tokenizer([TEXTS[i]], truncation=True, return_tensors="np")
        (row,) = session.run(None, {k: v.astype(np.int64) for k, v in one.items()})
        np.testing.assert_allclose(row[0], reference[i], atol=1e-4)


def test_the_default_export_is_the_merged_model_with_a_model_card(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = export(trained.run_dir, tmp_path / "merged")
    assert {p.name for p in result.output.iterdir()} == EXPORT_FILES - {"model.onnx"}
    assert result.info["formats"] == ["merged"] and list(result.info["checks"]) == ["merged_max_logit_diff"]
    card = (result.output / "README.md").read_text()
    # The Hub's format: YAML metadata first (a local base model is not named as a Hub id).
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\ntags:\n")
    assert "base_model:" not in card
    test = trained.metrics["test"]
    for line in (
        "| 0 | label_0 |",
        f"| lora.query | {trained.budget.groups['lora.query']:,} |",
        f"| trainable | {trained.budget.trainable:,} |",
        "| budget | 1,000,000 |",
        f"| test | 96 | {test['accuracy']:.4f} | {test['macro_f1']:.4f} |",
        "- LoRA r=4, alpha=8, dropout=0.1 on query, value; bias none; head `default`",
        'classifier = pipeline("text-classification", model="PATH_OR_HUB_ID", top_k=None)',
    ):
        assert line in card, line
    assert "onnxruntime" not in card.split("## How to load")[1].split("Or serve")[0]


@pytest.fixture(scope="module", params=["linear", "mean"])
def own_head_run(request, tiny_config, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path_factory.mktemp("runs") / request.param, max_steps=6, eval_every=6)
    return train(replace(cfg, model=replace(cfg.model, head=request.param)))


def test_own_heads_export_to_onnx_but_not_merged(own_head_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    head = own_head_run.cfg.model.head
    out = tmp_path / head
    code, stderr = main_exit("export", str(own_head_run.run_dir), str(out), "--format", "merged")
    assert code == 2, stderr
    assert f"model.head='{head}', which no transformers class reproduces" in stderr
    assert "--format onnx" in stderr and "Traceback" not in stderr
    assert not out.exists()
    code, stderr = main_exit("export", str(own_head_run.run_dir), str(out), "--format", "onnx")
    assert code == 0, stderr
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = AutoTokenizer.from_pretrained(out)(TEXTS[:8], padding=True, return_tensors="np")
    (logits,) = session.run(None, {k: v.astype(np.int64) for k, v in batch.items()})
    reference = load_run(own_head_run.run_dir, mixed_precision="no").logits(TEXTS[:8], use_cache=False)
    np.testing.assert_allclose(logits, reference, atol=1e-4)


@pytest.mark.parametrize(
    ("arch", "head", "form"), [("albert", "default", "all"), ("modernbert", "mean", "onnx")]
)
def test_other_architectures_export(  # type: ignore[no-untyped-def]
    arch: str, head: str, form: str, tiny_model_dir: Path, tiny_config, tmp_path: Path
) -> None:
    # ALBERT's own head (pooler + tanh + classifier) merges into a stock transformers model;
    # ModernBERT's mean head, with its pretrained head set aside, exports to ONNX
    folder = tiny_model(arch, tiny_model_dir, tmp_path / arch)
    cfg = tiny_config(tmp_path / "run", max_steps=6, eval_every=6)
    run = train(replace(cfg, model=replace(cfg.model, name_or_path=str(folder), head=head)))
    out = tmp_path / "export"
    code, stderr = main_exit("export", str(run.run_dir), str(out), "--format", form)
    assert code == 0, stderr
    reference = load_run(run.run_dir, mixed_precision="no").logits(TEXTS[:8], use_cache=False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    batch = AutoTokenizer.from_pretrained(out)(TEXTS[:8], padding=True, return_tensors="np")
    (logits,) = session.run(None, {k: v.astype(np.int64) for k, v in batch.items() if k in wanted})
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    if form == "all":  # the merged folder, through the real pipeline
        got = pipeline("text-classification", model=str(out), device="cpu")(
            TEXTS[:8], top_k=None, truncation=True
        )
        for scores, row in zip(got, classify(run.run_dir, TEXTS[:8]), strict=True):
            assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in scores} == row["probabilities"]


def test_bad_input_exits_2_before_any_work_and_writes_nothing(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_dir = str(trained.run_dir)
    out = tmp_path / "out"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained.run_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    cases = [
        ((str(tmp_path / "missing"), str(out)), f"run folder not found: {tmp_path / 'missing'}"),
        ((str(not_a_run), str(out)), "is not a budgetlora run folder: config.yaml is missing"),
        ((str(unfinished), str(out)), f"the run {unfinished} is not finished (metrics.json is missing)"),
        (
            (run_dir, str(out), "--model", str(tmp_path / "no-model")),
            f"the base model of {run_dir} cannot be read: model folder not found: {tmp_path / 'no-model'}",
        ),
        ((run_dir, str(out), "--format", "tflite"), "--format tflite: allowed: merged, onnx"),
        ((run_dir, str(out), "--format", ""), "--format (none): allowed"),
        ((run_dir, str(a_file)), f"OUT {a_file} exists and is not a folder"),
        ((run_dir, str(a_file / "sub")), f"{a_file} is a file, so nothing can be written"),
        ((run_dir,), "the following arguments are required: OUT"),
    ]
    for args, message in cases:
        code, stderr = main_exit("export", *args)
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr
        assert not out.exists()
    assert a_file.read_text() == "x"


def test_an_existing_export_is_kept_unless_overwrite(exported: Path, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "again"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, stderr = main_exit("export", str(trained.run_dir), str(out), "--format", "onnx")
    assert code == 2 and f"OUT {out} exists and is not empty; pass --overwrite" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, stderr = main_exit("export", str(trained.run_dir), str(out), "--format", "onnx", "--overwrite")
    assert code == 0, stderr
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # the old folder is gone, no staging left


def test_a_failed_export_leaves_the_old_folder_and_no_partial_one(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # The exporter dies after writing half a file (as on a full disk or a killed process).
    def broken_export(model, args, f, **kwargs) -> None:  # type: ignore[no-untyped-def]
        Path(f).write_bytes(b"\x08\x07half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    fresh = tmp_path / "fresh"
    with pytest.raises(
        BudgetloraError, match="the ONNX export of RobertaForSequenceClassification failed: disk full"
    ):
        export(trained.run_dir, fresh, formats=["merged", "onnx"])
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging sibling
    old = tmp_path / "old"
    old.mkdir()
    (old / "export.json").write_text("{}")
    with pytest.raises(BudgetloraError, match="disk full"):
        export(trained.run_dir, old, formats=["onnx"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert [p.name for p in old.iterdir()] == ["export.json"]


def test_an_export_that_scores_differently_is_refused() -> None:
    reference = np.array([[1.0, -1.0], [0.5, 0.25]], dtype=np.float32)
    assert _compare(reference + 1e-5, reference, "x") == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(
        ExportCheckError, match=r"the ONNX graph does not reproduce the merged model: logits differ by 0\.01"
    ):
        _compare(reference + 0.01, reference, "the ONNX graph")
    with pytest.raises(ExportCheckError, match="differ by inf"):
        _compare(reference[:1], reference, "x")
    assert ExportCheckError.exit_code == 1 and softmax(reference).shape == (2, 2)


def test_predict_and_classify_score_an_onnx_export(exported: Path, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from budgetlora.inference.predict import predict

    texts = tmp_path / "new.csv"
    texts.write_text("text\n" + "\n".join(TEXTS[:12]) + "\n")
    on_torch = predict(trained.run_dir, texts, output=tmp_path / "torch.csv")
    on_onnx = predict(exported, texts, output=tmp_path / "onnx.csv")
    assert on_onnx.read_text() == on_torch.read_text()  # ID,Label
    rows = [line.split(",") for line in on_onnx.with_suffix(".probs.csv").read_text().splitlines()]
    reference = [line.split(",") for line in on_torch.with_suffix(".probs.csv").read_text().splitlines()]
    assert rows[0] == reference[0] and [r[:3] for r in rows] == [r[:3] for r in reference]
    np.testing.assert_allclose(
        np.array([r[3:] for r in rows[1:]], dtype=float),
        np.array([r[3:] for r in reference[1:]], dtype=float),
        atol=1e-5,
    )
    for got, want in zip(classify(exported, TEXTS[:5]), classify(trained.run_dir, TEXTS[:5]), strict=True):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    code, stderr = main_exit("classify", str(exported), "--model", "x", "some text")
    assert code == 2 and "--model applies to a run folder" in stderr


def test_predict_and_classify_tell_runs_from_exports_as_serve_does(tmp_path: Path) -> None:
    """One rule says what a folder is: a folder that is neither gets serve's message, naming RUN_DIR."""
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    texts = tmp_path / "new.csv"
    texts.write_text("text\nsome text\n")
    neither = f"RUN_DIR {nothing} is neither a run folder (config.yaml) nor an export folder (export.json)"
    missing = tmp_path / "missing"
    for args, expected in [
        (("classify", str(nothing), "some text"), neither),
        (("predict", str(nothing), str(texts), "--output", str(tmp_path / "s.csv")), neither),
        (("classify", str(missing), "some text"), f"RUN_DIR {missing}: no such folder"),
    ]:
        code, stderr = main_exit(*args)
        assert code == 2 and expected in stderr, (args, stderr)
    assert not (tmp_path / "s.csv").exists()
