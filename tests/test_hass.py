"""HASS: the dataflow cost model against hand computation and brute force, the hooks' MAC counts, and the
search's guarantees (average sparsity, quality floor, never slower than uniform, determinism, speed)."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from condenser.compress.contract import macs as total_macs
from condenser.compress.sparse.hass import Dataflow, LayerCost, dataflow_estimate, layer_macs, search, sparse_macs
from condenser.compress.sparse.masks import apply_masks, magnitude_masks, prunable

LEVELS = [0.5, 0.75, 0.9, 0.95, 0.98]


def test_hand_computed_three_layers():
    """MACs a=1000, b=4000, c=2000 at 200 MHz.

    7 units: 7000 MACs / 7 units = 1000 cycles is the lower bound, met by units 1/4/2 (1000/1, 4000/4,
    2000/2 = 1000 each): interval 1000 cycles, 200e6 / 1000 = 200,000 inferences/s.

    6 units: the bound 7000/6 -> 1167 is not reachable. Units needed at interval T are ceil(1000/T) +
    ceil(4000/T) + ceil(2000/T). T=1333: 1 + 4 (4000/1333 = 3.0008) + 2 = 7 > 6. T=1334: 1 + 3 + 2 = 6 fits.
    So units 1/3/2, intervals 1000 / ceil(4000/3)=1334 / 1000, bottleneck b, 200e6/1334 = 149,925.04/s.
    (Every other split of 6 into three >= 1 leaves some layer at >= 2000 cycles.)"""
    macs = {"a": 1000, "b": 4000, "c": 2000}
    seven = Dataflow(units=7, clock_mhz=200).schedule(macs)
    assert seven.units == {"a": 1, "b": 4, "c": 2}
    assert seven.intervals == {"a": 1000, "b": 1000, "c": 1000}
    assert seven.interval == 1000 and seven.throughput == pytest.approx(200_000)
    six = Dataflow(units=6, clock_mhz=200).schedule(macs)
    assert six.units == {"a": 1, "b": 3, "c": 2}
    assert six.intervals == {"a": 1000, "b": 1334, "c": 1000}
    assert six.bottleneck == "b" and six.interval == 1334
    assert six.throughput == pytest.approx(200e6 / 1334)


def test_allocation_is_optimal_and_within_budget():
    """Against every allocation of the units (>= 1 each) on small random cases."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        n = int(rng.integers(1, 5))
        units = int(rng.integers(n, n + 7))
        work = {f"l{i}": int(rng.integers(0, 60)) for i in range(n)}
        schedule = Dataflow(units, 100).schedule(work)
        assert sum(schedule.units.values()) <= units and min(schedule.units.values()) >= 1
        assert schedule.intervals == {k: max(1, math.ceil(work[k] / schedule.units[k])) for k in work}
        assert schedule.interval == max(schedule.intervals.values()) == schedule.intervals[schedule.bottleneck]
        best = min(max(max(1, math.ceil(m / u)) for m, u in zip(work.values(), split))
                   for split in itertools.product(range(1, units + 1), repeat=n) if sum(split) <= units)
        assert schedule.interval == best


def test_too_few_units():
    with pytest.raises(ValueError, match="at least one compute unit each"):
        Dataflow(units=2, clock_mhz=100).schedule({"a": 10, "b": 10, "c": 10})
    layers = {name: LayerCost(100, 1000) for name in "abc"}
    sensitivity = {name: {level: level for level in LEVELS} for name in layers}
    with pytest.raises(ValueError, match="at least one compute unit each"):
        search(layers, sensitivity, 0.9, LEVELS, Dataflow(2, 100), 0.0, 0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.fc = nn.Linear(128, 10)
        self.shared = nn.Linear(10, 10)  # called twice
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.grouped(torch.relu(self.conv(x))).flatten(1))
        return self.shared(self.shared(h)) * scale


class Wrap(nn.Module):
    """As a kind's exportable() wraps its model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.inner(x, scale)


def test_layer_macs_by_hand():
    """On a 1x3x8x8 input: conv 8x8x8 outputs x 3 inputs x 9 = 13824; grouped conv (stride 2) 8x4x4 outputs
    x 8/4 inputs x 9 = 2304; fc 10 outputs x 128 = 1280; shared 2 calls x 10 x 10 = 200; unused: no stage."""
    model = Tiny()
    example = {"x": torch.randn(1, 3, 8, 8), "scale": torch.tensor(2.0)}
    expected = {"conv": 13824, "grouped": 2304, "fc": 1280, "shared": 200}
    assert layer_macs(model, example) == expected
    assert layer_macs(model, tuple(example.values())) == expected
    # Only convs and linears do multiply-accumulates here, so the whole-model count agrees.
    assert sum(expected.values()) == total_macs(model, tuple(example.values()))
    # A wrapper's layers are named as in the wrapped model when that is passed as `inner`.
    wrapped = Wrap(model)
    assert layer_macs(wrapped, example) == {f"inner.{name}": n for name, n in expected.items()}
    assert layer_macs(wrapped, example, inner=model) == expected


def test_dataflow_estimate_of_the_pruned_model_is_the_searched_schedule():
    """One cost model: prune a model to the searched allocation and the estimate read back from its
    weights is the schedule the search reported (sparsity rounded to whole weights on both sides)."""
    model = Tiny()
    example = (torch.randn(1, 3, 8, 8), torch.tensor(1.0))
    macs = layer_macs(model, example)
    layers = {name: LayerCost(prunable(model)[name].weight.numel(), n) for name, n in macs.items()}
    sensitivity = {name: {level: level ** 2 * (1 + i) for level in LEVELS} for i, name in enumerate(layers)}
    accelerator = Dataflow(8, 100)
    result = search(layers, sensitivity, 0.9, LEVELS, accelerator, 0.5, seed=0)
    assert dataflow_estimate(model, example, accelerator) == accelerator.schedule(macs)  # dense
    apply_masks(model, magnitude_masks(model, result.sparsity, "layer"))
    assert dataflow_estimate(model, example, accelerator) == result.searched.schedule
    assert sparse_macs({"conv": 13824}, {"conv": 0.5}) == {"conv": 6912}
    assert sparse_macs({"conv": 13824}, 0.95, {"conv": 216}) == {"conv": 13824 * 11 // 216}  # 205 pruned


def _synthetic(n: int = 12, seed: int = 0) -> tuple[dict[str, LayerCost], dict[str, dict[float, float]]]:
    """Layers whose MACs per weight differ as a conv net's do across resolutions (1 to 256 uses per weight),
    with error growing as sparsity^2 per weight, times a layer factor in [0.5, 2] (layers differ)."""
    rng = np.random.default_rng(seed)
    layers = {f"l{i}": LayerCost(weights=int(w), macs=int(w) * int(rng.choice([1, 16, 64, 256])))
              for i, w in enumerate(rng.integers(500, 20_000, n))}
    total = sum(c.weights for c in layers.values())
    sensitivity = {name: {level: rng.uniform(0.5, 2) * c.weights / total * level ** 2 for level in LEVELS}
                   for name, c in layers.items()}
    return layers, sensitivity


def _check(result, layers, sensitivity, target: float, slack: float, accelerator: Dataflow) -> None:
    """The constraints, recomputed from the allocation itself rather than from the search's tables."""
    weights = {n: c.weights for n, c in layers.items()}
    average = sum(weights[n] * s for n, s in result.sparsity.items()) / sum(weights.values())
    assert average >= target - 1e-12 and result.searched.average_sparsity == pytest.approx(average)
    assert result.uniform.average_sparsity == pytest.approx(target)
    assert result.searched.error <= result.uniform.error * (1 + slack) + 1e-12
    assert all(s == 0 or s in LEVELS or s == target for s in result.sparsity.values())
    macs, weights = {n: c.macs for n, c in layers.items()}, {n: c.weights for n, c in layers.items()}
    assert result.searched.schedule == accelerator.schedule(sparse_macs(macs, result.sparsity, weights))
    assert result.uniform.schedule == accelerator.schedule(sparse_macs(macs, target, weights))
    assert result.speedup >= 1
    assert result.history[0]["stage"] == "uniform"
    assert [h["interval"] for h in result.history] == sorted((h["interval"] for h in result.history), reverse=True)


@pytest.mark.parametrize("slack", [0.0, 0.05])
def test_search_beats_uniform_within_the_quality_floor(slack: float):
    layers, sensitivity = _synthetic()
    accelerator = Dataflow(units=64, clock_mhz=200)
    result = search(layers, sensitivity, 0.9, LEVELS, accelerator, slack, seed=0)
    _check(result, layers, sensitivity, 0.9, slack, accelerator)
    assert result.speedup >= 1.3
    # The sparsity went where the MACs are: the MAC-weighted sparsity rose above the weight-weighted one.
    macs = {n: c.macs for n, c in layers.items()}
    mac_weighted = sum(macs[n] * s for n, s in result.sparsity.items()) / sum(macs.values())
    assert mac_weighted > result.searched.average_sparsity


def test_convex_per_weight_sensitivity_at_zero_slack_keeps_uniform():
    """Error s^2 x weight fraction in every layer: by Jensen uniform has the least error of all allocations
    at its average, so at zero slack it is the only feasible one."""
    layers, _ = _synthetic()
    total = sum(c.weights for c in layers.values())
    sensitivity = {n: {level: c.weights / total * level ** 2 for level in LEVELS} for n, c in layers.items()}
    result = search(layers, sensitivity, 0.9, LEVELS, Dataflow(64, 200), 0.0, seed=0)
    assert result.sparsity == dict.fromkeys(layers, 0.9) and result.speedup == 1


def test_target_between_levels_and_baseline_are_interpolated():
    """Target 0.8 lies between measured 0.75 (error 1.3) and 0.9 (error 1.6) over a baseline of 1.0: the
    increase is 0.3 + (0.8 - 0.75) / (0.9 - 0.75) x (0.6 - 0.3) = 0.4 per layer, two layers: 1.0 + 0.8."""
    layers = {"a": LayerCost(100, 100 * 64), "b": LayerCost(100, 100 * 4)}
    errors = {0.5: 1.1, 0.75: 1.3, 0.9: 1.6, 0.95: 2.0, 0.98: 3.0}
    sensitivity = {"a": errors, "b": errors}
    result = search(layers, sensitivity, 0.8, LEVELS, Dataflow(8, 100), 0.0, seed=0, baseline=1.0)
    assert result.uniform.error == pytest.approx(1.8)
    assert result.uniform.sparsity == {"a": 0.8, "b": 0.8}
    _check(result, layers, sensitivity, 0.8, 0.0, Dataflow(8, 100))
    with pytest.raises(ValueError, match="must lie in"):
        search(layers, sensitivity, 0.99, LEVELS, Dataflow(8, 100), 0.0, seed=0)


def test_deterministic_and_fast():
    layers, sensitivity = _synthetic(n=100, seed=1)
    accelerator = Dataflow(units=256, clock_mhz=200)
    start = time.perf_counter()
    first = search(layers, sensitivity, 0.9, LEVELS, accelerator, 0.05, seed=3)
    elapsed = time.perf_counter() - start
    assert first.to_dict() == search(layers, sensitivity, 0.9, LEVELS, accelerator, 0.05, seed=3).to_dict()
    other = search(layers, sensitivity, 0.9, LEVELS, accelerator, 0.05, seed=4)
    _check(first, layers, sensitivity, 0.9, 0.05, accelerator)
    _check(other, layers, sensitivity, 0.9, 0.05, accelerator)
    assert elapsed < 3  # about 0.5 s on one core; the bound leaves room for a loaded machine
