"""HASS: per-layer sparsity searched against a virtual layer-pipelined dataflow accelerator.

The cost model (`Dataflow`) is the HASS setting: every prunable layer is a pipeline stage with its own
compute units (one MAC per cycle each) out of a shared budget; a stage skips zero weights, so its
initiation interval is ceil(non-zero MACs / units) cycles, and the pipeline accepts one inference per
slowest-stage interval. The same model estimates a deployed model (`dataflow_estimate`), so the search
and the validate stage's dataflow target cannot disagree.

The search picks each layer's sparsity from {0, target} ∪ levels. Quality is estimated additively:
baseline + the sum over layers of the error increase measured with only that layer pruned, linearly
interpolated between measured levels (0 increase at sparsity 0). Uniform sparsity at `target` is the
comparison; the search keeps the weight-weighted average sparsity >= target and the estimated error
<= uniform's * (1 + slack), and maximises the modelled throughput.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from condenser.compress.sparse.masks import layer_sparsity, prunable

Example = Mapping[str, torch.Tensor] | tuple[torch.Tensor, ...]


def layer_macs(model: nn.Module, example: Example, inner: nn.Module | None = None) -> dict[str, int]:
    """Dense MACs of one forward pass (eval, no grad) per prunable layer, counted by forward hooks from the
    output shapes: conv = output elements x in_channels/groups x kernel area, linear = output elements x
    in_features. `example` holds the forward's positional arguments (a dict's values in order). The layers
    are `inner`'s (default `model`'s), named as in its named_modules(): pass the wrapped model when `model`
    wraps it (a kind's exportable()). Layers the forward never runs are left out: no pipeline stage."""
    layers = prunable(inner if inner is not None else model)
    counts: dict[str, int] = {}

    def hook(name: str):
        def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            per_output = (module.in_features if isinstance(module, nn.Linear)
                          else module.in_channels // module.groups * math.prod(module.kernel_size))
            counts[name] = counts.get(name, 0) + output.numel() * per_output
        return count

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    args = tuple(example.values()) if isinstance(example, Mapping) else tuple(example)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {name: counts[name] for name in layers if name in counts}


@dataclass(frozen=True)
class LayerCost:
    weights: int  # prunable weights (what the average sparsity is weighted by)
    macs: int     # dense MACs of one forward pass


@dataclass(frozen=True)
class Schedule:
    units: dict[str, int]      # compute units per layer
    intervals: dict[str, int]  # each layer's initiation interval, cycles
    bottleneck: str            # the (first) layer with the longest interval
    interval: int              # the pipeline's interval: the longest layer interval, cycles
    throughput: float          # inferences per second


def _interval(work: np.ndarray, units: int) -> int:
    """The smallest interval T whose unit demand sum(max(1, ceil(work / T))) fits in `units`: the demand
    falls as T grows, so binary search finds the optimum of the integer allocation exactly. Bounds: T can't
    beat sum(work) / units; with one unit each (units >= layers) T = max(work) fits."""
    lo, hi = max(1, -(-int(work.sum()) // units)), max(1, int(work.max()))
    while lo < hi:
        mid = (lo + hi) // 2
        if np.maximum(1, -(-work // mid)).sum() <= units:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Dataflow:
    """A layer-pipelined dataflow accelerator: `units` MAC units shared by the layers, at `clock_mhz`."""

    units: int
    clock_mhz: float

    def __post_init__(self) -> None:
        if self.units < 1 or self.clock_mhz <= 0:
            raise ValueError(f"a dataflow accelerator needs units >= 1 and clock_mhz > 0, not {self}")

    def schedule(self, nonzero_macs: Mapping[str, float]) -> Schedule:
        """The allocation of units (>= 1 per layer) minimising the slowest layer's interval. Fractional MAC
        counts are rounded up (float noise tolerated); a stage takes at least one cycle."""
        names = list(nonzero_macs)
        if not names:
            raise ValueError("no layers to schedule")
        if len(names) > self.units:
            raise ValueError(f"{len(names)} layers need at least one compute unit each, but the accelerator "
                             f"has {self.units} units (raise hass units)")
        work = np.array([math.ceil(round(float(nonzero_macs[n]), 6)) for n in names], dtype=np.int64)
        if (work < 0).any():
            raise ValueError("non-zero MACs must be >= 0")
        units = np.maximum(1, -(-work // _interval(work, self.units)))
        intervals = np.maximum(1, -(-work // units))
        slowest = int(np.argmax(intervals))
        return Schedule(units=dict(zip(names, units.tolist())), intervals=dict(zip(names, intervals.tolist())),
                        bottleneck=names[slowest], interval=int(intervals[slowest]),
                        throughput=self.clock_mhz * 1e6 / int(intervals[slowest]))


def sparse_macs(macs: Mapping[str, int], sparsity: Mapping[str, float] | float,
                weights: Mapping[str, int] | None = None) -> dict[str, int]:
    """Non-zero MACs under unstructured sparsity (one fraction, or one per layer; layers left out are
    dense): every weight of a conv or linear is used equally often, so sparsity s leaves macs x (1 - s).
    Given the layers' weight counts, s is first rounded to whole weights as magnitude pruning rounds it."""
    amounts = sparsity if isinstance(sparsity, Mapping) else dict.fromkeys(macs, float(sparsity))
    amounts = {name: amounts.get(name, 0.0) for name in macs}
    if weights is not None:
        amounts = {name: round(s * weights[name]) / weights[name] for name, s in amounts.items()}
    return {name: round(n * (1 - amounts[name])) for name, n in macs.items()}


def dataflow_estimate(model: nn.Module, example: Example, accelerator: Dataflow,
                      inner: nn.Module | None = None) -> Schedule:
    """The accelerator's schedule of a deployed model: its layer MACs scaled by each layer's measured
    fraction of non-zero weights (the validate stage's dataflow target). `inner` as for layer_macs."""
    return accelerator.schedule(sparse_macs(layer_macs(model, example, inner),
                                            layer_sparsity(inner if inner is not None else model)))


@dataclass(frozen=True)
class Allocation:
    sparsity: dict[str, float]
    average_sparsity: float  # weighted by weight count
    error: float             # estimated: baseline + summed per-layer error increases
    schedule: Schedule

    @property
    def throughput(self) -> float:
        return self.schedule.throughput


@dataclass(frozen=True)
class HassResult:
    searched: Allocation
    uniform: Allocation
    # The search's progress, one entry per new best: stage, interval, throughput, error, average sparsity.
    history: list[dict]

    @property
    def sparsity(self) -> dict[str, float]:
        return self.searched.sparsity

    @property
    def speedup(self) -> float:
        return self.searched.throughput / self.uniform.throughput

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def _error_increase(measured: Mapping, sparsity: float, baseline: float, layer: str) -> float:
    points = sorted((float(level), max(0.0, float(error) - baseline)) for level, error in measured.items())
    if sparsity > points[-1][0] + 1e-12:
        raise ValueError(f"layer {layer}: sensitivity measured up to {points[-1][0]}, not at {sparsity}")
    # A measured improvement over the baseline is noise, not credit: increases are clipped at 0.
    return float(np.interp(sparsity, [0.0] + [p[0] for p in points], [0.0] + [p[1] for p in points]))


class _Search:
    """The search's tables, layers x choices: weighted sparsity, error increase and non-zero MACs."""

    def __init__(self, layers: Mapping[str, LayerCost], sensitivity: Mapping, choices: np.ndarray, start: int,
                 accelerator: Dataflow, slack: float, baseline: float):
        self.names, self.choices, self.units = list(layers), choices, accelerator.units
        self.rows = np.arange(len(self.names))
        self.w = np.array([layers[n].weights for n in self.names], dtype=float)
        self.sparse = self.w[:, None] * choices  # weights pruned
        self.error = np.array([[_error_increase(sensitivity[n], c, baseline, n) for c in choices]
                               for n in self.names])
        macs, weights = ({n: getattr(layers[n], key) for n in self.names} for key in ("macs", "weights"))
        self.work = np.array([list(sparse_macs(macs, float(c), weights).values()) for c in choices],
                             dtype=np.int64).T
        # Tolerances so that uniform itself passes; the error budget is the increase allowed over baseline.
        self.floor = choices[start] * self.w.sum() * (1 - 1e-12)
        self.budget = (baseline + self.error[:, start].sum()) * (1 + slack) * (1 + 1e-12) + 1e-15 - baseline

    def interval(self, idx: np.ndarray) -> int:
        return _interval(self.work[self.rows, idx], self.units)

    def rank(self, idx: np.ndarray) -> tuple[int, float]:
        """Better is faster, then (at the same interval) a lower estimated error."""
        return self.interval(idx), float(self.error[self.rows, idx].sum())

    def moves(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Callable]:
        """Which (raise layer i one level, lower layer j one level) pairs keep both constraints (column L:
        lower none); the raised and lowered levels; and a table's total after each pair."""
        k, rows = len(self.choices), self.rows
        up, down = np.minimum(idx + 1, k - 1), np.append(np.maximum(idx - 1, 0), 0)

        def pair_total(table: np.ndarray) -> np.ndarray:
            now = table[rows, idx]
            return (now.sum() + (table[rows, up] - now)[:, None]
                    + np.append(table[rows, down[:-1]] - now, 0)[None, :])

        ok = ((idx < k - 1)[:, None] & np.append(idx > 0, True)[None, :]
              & (rows[:, None] != np.append(rows, -1)[None, :])
              & (pair_total(self.sparse) >= self.floor) & (pair_total(self.error) <= self.budget))
        return ok, up, down, pair_total

    def descend(self, idx: np.ndarray) -> np.ndarray:
        """Steepest descent over single raises and raise+lower pairs, scored at the next shorter interval
        T - 1 by the unit demand, then by its relaxation sum(max(1, work / (T - 1))): the relaxation sees
        progress between integer steps and counts nothing for layers that fit in one unit anyway, so those
        become donors of average sparsity. Moves must keep the demand at T within the budget."""
        while (t := self.interval(idx)) > 1:
            ok, up, down, pair_total = self.moves(idx)
            ok &= pair_total(np.maximum(1, -(-self.work // t))) <= self.units
            if not ok.any():
                return idx
            demand = np.maximum(1, -(-self.work // (t - 1)))
            relaxed = np.maximum(1.0, self.work / (t - 1))
            current = (demand[self.rows, idx].sum(), relaxed[self.rows, idx].sum())
            demands, relaxeds = pair_total(demand), pair_total(relaxed)
            fewest = demands[ok].min()
            i, j = np.unravel_index(np.argmin(np.where(ok & (demands == fewest), relaxeds, np.inf)), ok.shape)
            if (fewest, relaxeds[i, j]) >= (current[0], current[1] * (1 - 1e-9)):
                return idx
            idx = idx.copy()
            idx[i] = up[i]
            if j < len(self.names):
                idx[j] = down[j]
        return idx

    def packed(self, t: int, mus: np.ndarray, rounds: int = 3) -> np.ndarray | None:
        """An allocation with interval <= t, if a Lagrangian dynamic programme finds one. At t each layer's
        levels cost exact integer units; a DP over units used maximises pruned weights - mu x error
        increase for many mu at once. Both fall as mu grows, so the smallest mu within the error budget
        gives the most pruned weights the budget allows: its bracket is refined `rounds` times."""
        need, k, top = np.maximum(1, -(-self.work // t)), len(self.choices), self.units + 1
        sparse, error = self.sparse / self.w.sum(), self.error / max(self.budget, 1e-30)
        for _ in range(rounds):
            value = sparse[None] - mus[:, None, None] * error[None]
            total = np.full((len(mus), top), -np.inf)
            total[:, 0] = 0
            pick = np.zeros((len(self.names), len(mus), top), dtype=np.int8)
            for i in self.rows:
                new = np.full_like(total, -np.inf)
                for c in range(k):
                    u = need[i, c]
                    if u < top:
                        shifted = total[:, :top - u] + value[:, i, c][:, None]
                        better = shifted > new[:, u:]
                        new[:, u:][better], pick[i][:, u:][better] = shifted[better], c
                total = new
            used = np.argmax(total, axis=1)
            if not np.isfinite(total[0, used[0]]):
                return None  # no allocation fits the units at t
            idx = np.zeros((len(mus), len(self.names)), dtype=int)
            for i in self.rows[::-1]:
                idx[:, i] = pick[i, np.arange(len(mus)), used]
                used = used - need[i, idx[:, i]]
            within = np.flatnonzero(self.error[self.rows, idx].sum(1) <= self.budget)
            if not len(within):
                return None
            first = within[0]
            if self.sparse[self.rows, idx[first]].sum() >= self.floor:
                return idx[first]
            if first == 0:
                return None
            mus = np.linspace(mus[first - 1], mus[first], len(mus))
        return None


def search(layers: Mapping[str, LayerCost], sensitivity: Mapping[str, Mapping[float, float]], target: float,
           levels: list[float], accelerator: Dataflow, slack: float, seed: int, baseline: float = 0.0,
           kicks: int = 4) -> HassResult:
    """Per-layer sparsity from {0, target} ∪ levels with the best modelled throughput at a weight-weighted
    average >= target and an estimated error <= uniform's * (1 + slack). Uniform at `target` is the
    comparison and the first start, so the result is never slower than uniform.

    Three parts: a local descent from uniform (`_Search.descend`); a binary search on the interval with a
    Lagrangian DP deciding each (`_Search.packed`), itself descended from; then `kicks` seeded random walks
    of feasible pair moves from the best so far, each descended from (iterated local search). All
    deterministic given `seed`."""
    if not 0 < target <= max(levels):
        raise ValueError(f"hass target sparsity {target} must lie in (0, {max(levels)}] (the measured levels)")
    missing = sorted(set(layers) - set(sensitivity))
    if missing:
        raise ValueError(f"no sensitivity for layers {missing[:3]}")
    choices = np.array(sorted({0.0, float(target), *map(float, levels)}))
    start = int(np.searchsorted(choices, target))
    s = _Search(layers, sensitivity, choices, start, accelerator, slack, baseline)
    uniform = np.full(len(s.names), start)

    def summary(idx: np.ndarray, stage: str) -> dict:
        t = s.interval(idx)
        return {"stage": stage, "interval": t, "throughput": accelerator.clock_mhz * 1e6 / t,
                "error": baseline + float(s.error[s.rows, idx].sum()),
                "average_sparsity": float(s.sparse[s.rows, idx].sum() / s.w.sum())}

    def allocation(idx: np.ndarray) -> Allocation:
        stats = summary(idx, "")
        return Allocation(sparsity={n: float(choices[i]) for n, i in zip(s.names, idx)},
                          average_sparsity=stats["average_sparsity"], error=stats["error"],
                          schedule=accelerator.schedule(dict(zip(s.names, s.work[s.rows, idx].tolist()))))

    comparison = allocation(uniform)  # first: the schedule says so if the units can't hold the layers
    history, best = [summary(uniform, "uniform")], uniform

    def consider(idx: np.ndarray, stage: str) -> None:
        nonlocal best
        if s.rank(idx) < s.rank(best):
            best = idx
            history.append(summary(idx, stage))

    consider(s.descend(uniform), "descent")
    lo, hi, found = _interval(s.work[:, -1], s.units), s.interval(best) - 1, None
    mus = np.concatenate([[0.0], np.geomspace(1e-3, 1e5, 15)])
    while lo <= hi:
        mid = (lo + hi) // 2
        idx = s.packed(mid, mus)
        lo, hi, found = (mid + 1, hi, found) if idx is None else (lo, mid - 1, idx)
    if found is not None:
        consider(found, "dp")
        consider(s.descend(found), "dp+descent")
    rng = np.random.default_rng(seed)
    for kick in range(kicks):
        idx = best.copy()
        for _ in range(max(2, len(s.names) // 8)):
            ok, up, down, _ = s.moves(idx)
            if not ok.any():
                break
            i, j = np.unravel_index(rng.choice(np.flatnonzero(ok)), ok.shape)
            idx[i] = up[i]
            if j < len(s.names):
                idx[j] = down[j]
        consider(s.descend(idx), f"kick {kick + 1}")
    return HassResult(searched=allocation(best), uniform=comparison, history=history)
