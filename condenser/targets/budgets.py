"""A target's budgets checked against one validated row: which budget failed, by how much, and which node.

A row is plain data (`latency_ms`, `size_bytes`, `peak_memory_bytes`, `quality`, `quality_drop`); the
check says what is wrong in words a person acts on ("latency p50 1.30 ms over the 1.00 ms budget by
0.30 ms (+30%)"), with the figures beside the words so the report can tabulate them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from condenser.core.config import Budgets, MeasuredTarget, VirtualTarget
from condenser.core.errors import ConfigError


@dataclass(frozen=True)
class Failure:
    budget: str
    limit: float | None
    value: Any
    margin: float | None  # how far past the limit, in the budget's unit (None for an operator)
    message: str
    node: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def budgets_for(target: MeasuredTarget | VirtualTarget, deliverable: str, kind: str) -> Budgets | None:
    """The budgets a deliverable meets on `target`: its own entry, else its kind's, else none."""
    return target.budgets.get(deliverable, target.budgets.get(kind))


def metric(quality: Mapping, key: str) -> float | None:
    """A quality figure by dotted key (`prompt_accuracy.digit`); None when the row does not have it."""
    value: Any = quality
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def _direction(directions: Mapping[str, str], key: str) -> str:
    return directions[key.split(".")[0]]


def check_quality_keys(budgets: Budgets, directions: Mapping[str, str], where: str) -> None:
    """Quality budgets must name the kind's metrics: a typo would otherwise be a budget never checked."""
    for field in ("min_quality", "max_drop"):
        for key in getattr(budgets, field):
            if key.split(".")[0] not in directions:
                raise ConfigError(f"{where}.{field}.{key}: not a quality metric of this deliverable kind "
                                  f"({', '.join(directions)}); use one of them (nested ones dotted, e.g. "
                                  "prompt_accuracy.digit)")


def quality_drop(quality: Mapping, teacher: Mapping, directions: Mapping[str, str]) -> dict[str, float]:
    """How much worse than the teacher, per metric both have (positive: worse), flattened to dotted keys."""
    out = {}
    for key in _leaves(teacher):
        mine, theirs = metric(quality, key), metric(teacher, key)
        if mine is None or theirs is None or key.split(".")[0] not in directions:
            continue
        out[key] = theirs - mine if _direction(directions, key) == "higher" else mine - theirs
    return out


def _leaves(d: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            keys += _leaves(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)):
            keys.append(f"{prefix}{k}")
    return keys


def _over(budget: str, label: str, value: float, limit: float, unit: str, fmt: str) -> Failure:
    margin = value - limit
    return Failure(budget, limit, value, margin,
                   f"{label} {value:{fmt}}{unit} over the {limit:{fmt}}{unit} budget by {margin:{fmt}}{unit} "
                   f"(+{margin / limit:.0%})")


def check(row: Mapping, budgets: Budgets | None, directions: Mapping[str, str],
          bad_operators: list[dict] | None = None) -> list[Failure]:
    """Every budget `row` breaks. Latency, bytes and memory are upper bounds; `min_quality` is the worst
    value allowed in the metric's own direction; `max_drop` bounds the drop against the teacher. Operators
    outside the target's list come from the graph analysis (`bad_operators`), one failure per node."""
    failures = []
    latency = row.get("latency_ms") or {}
    if budgets is not None:
        for budget, key, label in (("latency_p50_ms", "median", "latency p50"), ("latency_p95_ms", "p95",
                                                                                 "latency p95")):
            limit = getattr(budgets, budget)
            if limit is not None and latency.get(key) is not None and latency[key] > limit:
                failures.append(_over(budget, label, latency[key], limit, " ms", ".3g"))
        for budget, field, label in (("model_bytes", "size_bytes", "model size"),
                                     ("peak_memory_bytes", "peak_memory_bytes", "peak memory")):
            limit, value = getattr(budgets, budget), row.get(field)
            if limit is not None and value is not None and value > limit:
                failures.append(_over(budget, label, value, limit, " B", ",.0f"))
        quality = row.get("quality") or {}
        for key, limit in budgets.min_quality.items():
            value = metric(quality, key)
            if value is None:
                failures.append(Failure(f"min_quality.{key}", limit, None, None,
                                        f"quality {key} was not measured for this level; it cannot meet its budget"))
                continue
            higher = _direction(directions, key) == "higher"
            if (value < limit) if higher else (value > limit):
                margin = limit - value if higher else value - limit
                word = "under the floor" if higher else "over the ceiling"
                failures.append(Failure(f"min_quality.{key}", limit, value, margin,
                                        f"{key} {value:.4g} {word} of {limit:.4g} by {margin:.4g}"))
        drops = row.get("quality_drop") or {}
        for key, limit in budgets.max_drop.items():
            value = drops.get(key)
            if value is None:
                failures.append(Failure(f"max_drop.{key}", limit, None, None,
                                        f"no teacher figure for {key}: its drop cannot be checked"))
            elif value > limit:
                failures.append(Failure(f"max_drop.{key}", limit, value, value - limit,
                                        f"{key} {value:.4g} below the teacher, more than the {limit:.4g} allowed "
                                        f"by {value - limit:.4g}"))
    for bad in bad_operators or []:
        failures.append(Failure("operators", None, bad["op"], None,
                                f"operator {bad['op']} (node {bad['node']}) {bad['reason']}", node=bad["node"]))
    return failures
