"""condenser.runtime.executorch on tiny conv nets: fp32 and int8 .pte files, calibration rows, background
lowering in worker processes, and ExecuTorch latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condenser.runtime.executorch import (
    Lowering,
    arena_bytes,
    calibration_rows,
    compare_pte_latency,
    export_pte,
    pte_latency,
    run_pte,
)

EXAMPLE = (torch.zeros(1, 3, 16, 16),)


def conv_net(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1)).eval()


def calibration(batches: int = 2) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 16, 16, generator=gen),) for _ in range(batches)]


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max and mean absolute error, as fractions of the reference output's range."""
    err, span = (out - ref).abs(), float(ref.max() - ref.min())
    return float(err.max()) / span, float(err.mean()) / span


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A net whose weights (150k) dominate its file, lowered fp32 and int8 (calibrated on batch-16 tuples)."""
    folder = tmp_path_factory.mktemp("pte")
    model = conv_net(128)
    files = {"fp32": export_pte(model, EXAMPLE, folder / "fp32.pte"),
             "int8": export_pte(model, EXAMPLE, folder / "int8.pte", calibration())}
    return model, files, folder


def test_fp32_matches_pytorch(wide):
    model, files, folder = wide
    assert files["fp32"] == folder / "fp32.pte"
    # Written through a temporary file that is gone once renamed.
    assert sorted(p.name for p in folder.iterdir()) == ["fp32.pte", "int8.pte"]
    x = torch.randn(1, 3, 16, 16)
    out = run_pte(files["fp32"], (x,))
    assert out.shape == (1, 3, 16, 16)
    assert (out - reference(model, x)).abs().max() < 1e-4


def test_int8_is_smaller_and_close(wide):
    model, files, _ = wide
    assert files["fp32"].stat().st_size >= 3 * files["int8"].stat().st_size
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    worst, mean = relative_error(run_pte(files["int8"], (x,)), reference(model, x))
    # int8 weights and activations: a few percent at worst, well under one on average.
    assert worst < 0.05 and mean < 0.01


def test_arena_holds_at_least_the_inputs_and_outputs(wide):
    _, files, _ = wide
    assert arena_bytes(files["fp32"]) >= 2 * EXAMPLE[0].numel() * 4


def test_calibration_rows_split_batches_evenly():
    batches = [(torch.arange(16.0).reshape(16, 1), torch.arange(16)), (torch.arange(16.0, 21.0).reshape(5, 1),
                                                                         torch.arange(16, 21))]
    rows = calibration_rows(batches, max_examples=8)
    assert len(rows) == 8 and all(x.shape == (1, 1) and t.shape == (1,) for x, t in rows)
    firsts = [int(t) for _, t in rows]
    assert firsts[0] == 0 and firsts[-1] == 20 and firsts == sorted(set(firsts))
    assert all(int(x) == int(t) for x, t in rows)
    # Copies, not views: a pickled view would carry its whole batch.
    assert all(x.untyped_storage().nbytes() == x.nbytes for x, _ in rows)
    assert [int(t) for _, t in calibration_rows(batches, max_examples=64)] == list(range(21))
    with pytest.raises(ValueError, match="batch sizes"):
        calibration_rows([(torch.zeros(2, 1), torch.zeros(3))])


def test_lowering_runs_jobs_in_workers_on_the_models_as_given(tmp_path):
    model = conv_net(8)
    x = torch.randn(1, 3, 16, 16)
    expected = reference(model, x)
    jobs = {"fp32": (model, EXAMPLE, tmp_path / "a.pte", None),
            "int8": (model, EXAMPLE, tmp_path / "b.pte", calibration(1))}
    with Lowering(jobs, workers=2) as lowering:
        # The jobs were pickled when the Lowering was made: changing the model now changes no file.
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        files = lowering.result()
    assert files == {"fp32": tmp_path / "a.pte", "int8": tmp_path / "b.pte"}
    assert (run_pte(files["fp32"], (x,)) - expected).abs().max() < 1e-4
    assert relative_error(run_pte(files["int8"], (x,)), expected)[0] < 0.05


def test_lowering_names_the_failed_job(tmp_path):
    wrong_channels = (torch.zeros(1, 5, 16, 16),)
    with Lowering({"broken": (conv_net(8), wrong_channels, tmp_path / "x.pte", None)}, workers=1) as lowering:
        with pytest.raises(RuntimeError, match="lowering 'broken'"):
            lowering.result()
    assert not (tmp_path / "x.pte").exists()


def test_latency_records_threads(wide):
    _, files, _ = wide
    one = pte_latency(files["fp32"], EXAMPLE, repeats=10)
    assert 0 < one.median_ms <= one.p95_ms and (one.repeats, one.warmup, one.threads) == (10, 3, 1)
    both = compare_pte_latency(files, EXAMPLE, repeats=10, rounds=2, threads=2)
    assert set(both) == {"fp32", "int8"}
    for timing in both.values():
        assert 0 < timing.median_ms <= timing.p95_ms and (timing.repeats, timing.threads) == (10, 2)
    with pytest.raises(ValueError, match="threads"):
        pte_latency(files["fp32"], EXAMPLE, repeats=1, threads=0)
