"""Per-layer sensitivity: the output error when only one layer is pruned, at each sparsity level.

Measured once per deliverable on its own inputs: each prunable layer alone is magnitude-pruned to each
level and the kind's loss against the dense model (the same loss fine-tuning minimises; 0 for the dense
model itself) is averaged over a fixed set of examples. It feeds HASS's quality estimate (the sum of the
chosen levels' errors, an additive approximation) and the report's sensitivity table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from condenser.compress.sparse.masks import magnitude_masks, prunable
from condenser.compress.sparse.train import Examples
from condenser.deliverables.base import Kind


@dataclass(frozen=True)
class Sensitivity:
    levels: list[float]
    # layer -> {level: error}
    errors: dict[str, dict[float, float]]

    def ranked(self, level: float) -> list[tuple[str, float]]:
        """Layers from most to least sensitive at `level`."""
        return sorted(((name, errs[level]) for name, errs in self.errors.items()), key=lambda r: -r[1])

    def to_dict(self) -> dict:
        return {"levels": self.levels,
                "errors": {name: {str(level): e for level, e in errs.items()} for name, errs in self.errors.items()}}


@torch.no_grad()
def measure_sensitivity(kind: Kind, dense: nn.Module, examples: Examples, levels: list[float], limit: int,
                        batch_size: int) -> Sensitivity:
    # The pruned copy shares nothing with the reference it is compared to.
    model = copy.deepcopy(dense).eval()
    dense.eval()
    # The dense outputs are the same for every (layer, level): computed once, the pruned forward only.
    batches = list(examples.batches(batch_size * 4, limit))
    targets = [kind.forward(dense, batch) for batch in batches]
    count = sum(len(t) for t in targets)

    def error() -> float:
        total = sum(float(kind.error(kind.forward(model, b), t).sum()) for b, t in zip(batches, targets, strict=True))
        return total / count

    errors: dict[str, dict[float, float]] = {}
    for name, layer in tqdm(prunable(model).items(), desc="sparse: sensitivity", unit="layer", leave=False):
        original = layer.weight.detach().clone()
        errors[name] = {}
        for level in levels:
            mask = magnitude_masks(model, {name: level}, "layer")[name]
            layer.weight.mul_(mask)
            errors[name][level] = error()
            layer.weight.copy_(original)
    return Sensitivity(levels=list(levels), errors=errors)
