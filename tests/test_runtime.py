"""The device module: every decision of a CUDA or CPU process, and the DataLoader paths
(workers, pinned memory, padding to a multiple of 8) that CUDA takes, run on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetlora.data.batching import Collator, Encoded, iterate, sorted_batches
from budgetlora.runtime import make_runtime, next_interval, plan_device


def test_a_gpu_with_native_bf16_gets_bf16_and_every_cuda_setting() -> None:
    plan = plan_device("cuda", "auto", gpu_native_bf16=True)
    assert plan.mixed_precision == "bf16" and plan.inference_dtype == torch.bfloat16
    assert plan.pin_memory and plan.fused_optimizer and plan.tf32
    assert plan.pad_to_multiple_of == 8 and plan.inference_batch_size == 256
    assert plan.note is None


def test_a_gpu_without_native_bf16_gets_fp16_not_emulated_bf16() -> None:
    plan = plan_device("cuda", "auto", gpu_native_bf16=False)  # V100, T4
    assert plan.mixed_precision == "fp16" and plan.inference_dtype == torch.float16


def test_an_explicit_precision_on_a_gpu_is_kept() -> None:
    assert plan_device("cuda", "no", gpu_native_bf16=True).inference_dtype == torch.float32
    assert plan_device("cuda", "bf16", gpu_native_bf16=False).mixed_precision == "bf16"


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_a_cpu_gets_bf16_only_with_bf16_units(fast_bf16: bool, expected: str) -> None:
    plan = plan_device("cpu", "auto", cpu_fast_bf16=fast_bf16)
    assert plan.mixed_precision == expected
    assert not (plan.pin_memory or plan.fused_optimizer or plan.tf32)
    assert plan.pad_to_multiple_of == 1 and plan.inference_batch_size == 16


def test_fp16_on_a_cpu_runs_in_fp32_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_device("cpu", "fp16")
    assert plan.mixed_precision == "no" and plan.inference_dtype == torch.float32
    assert plan.note is not None and "fp16 needs a GPU" in plan.note
    runtime = make_runtime("fp16")  # the real runtime of this (CPU) process
    assert runtime.device.type == "cpu" and runtime.mixed_precision == "no"
    assert runtime.accelerator.mixed_precision == "no"
    assert "fp16 needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("steps", "elapsed", "expected"),
    [
        (20, 2.0, 20),  # 0.1 s a step: 50 steps would make 5 s, capped at the log interval 20
        (20, 40.0, 2),  # 2 s a step: every 2 steps
        (4, 60.0, 1),  # 15 s a step: every step
        (20, 0.0, 20),  # no time measured: the log interval
    ],
)
def test_stop_agreements_come_about_every_five_seconds(steps: int, elapsed: float, expected: int) -> None:
    assert next_interval(steps, elapsed, seconds=5.0, max_interval=20) == expected


def _encoded(lengths: list[int]) -> Encoded:
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 100, size=n).astype(np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = np.arange(len(lengths), dtype=np.int64) % 4
    return Encoded(np.concatenate(rows), offsets, np.asarray(lengths, dtype=np.int32), labels)


@pytest.mark.parametrize(("workers", "pin"), [(0, True), (2, False), (2, True)])
def test_the_dataloader_path_gives_the_same_batches(workers: int, pin: bool) -> None:
    encoded = _encoded([3, 17, 9, 12, 5, 30, 8, 8, 21, 2, 14])
    collate = Collator(encoded, pad_token_id=1)
    batches = sorted_batches(encoded.lengths, 4)
    direct = list(iterate(batches, collate))
    loaded = list(iterate(batches, collate, num_workers=workers, pin_memory=pin))
    assert len(loaded) == len(direct) == 3
    for got, want in zip(loaded, direct, strict=True):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])


def test_batches_are_padded_to_a_multiple_of_eight() -> None:
    encoded = _encoded([3, 17, 9])
    batch = Collator(encoded, pad_token_id=1, pad_to_multiple_of=8)(np.array([0, 1, 2]))
    assert batch["input_ids"].shape == (3, 24)  # 17 rounded up
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 17, 9]
    assert (batch["input_ids"][0, 3:] == 1).all() and (batch["input_ids"][1, 17:] == 1).all()
    assert torch.equal(batch["input_ids"][1, :17], torch.from_numpy(encoded.row(1).astype(np.int64)))
