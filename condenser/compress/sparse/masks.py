"""Unstructured sparsity masks: which weights are pruned, by magnitude, and holding them at zero.

The prunable weights are those of every Conv2d and Linear layer (the multiply-accumulates a sparse
accelerator skips); biases, norms and embedding tables stay dense. A mask is a bool tensor per layer,
True where the weight survives. Masks are plain data, so methods (gradual pruning, MEST's prune-and-grow,
a searched per-layer allocation) compute them and the training loop only holds them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights unstructured sparsity prunes, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _keep_largest(magnitude: torch.Tensor, prune: int) -> torch.Tensor:
    """A mask keeping all but the `prune` smallest entries; ties broken by position (stable sort), so
    the same weights always give the same mask."""
    mask = torch.ones(magnitude.numel(), dtype=torch.bool)
    if prune > 0:
        order = torch.argsort(magnitude.flatten(), stable=True)
        mask[order[:prune]] = False
    return mask.view_as(magnitude)


def magnitude_masks(model: nn.Module, sparsity: float | Mapping[str, float], scope: str = "layer") -> Masks:
    """Masks pruning the smallest-magnitude weights.

    `sparsity` is one fraction for every layer, or a fraction per layer name (layers left out stay dense).
    scope "global" ranks all prunable weights together against one fraction (layers that matter keep
    more); scope "layer" prunes each layer to its own fraction."""
    layers = prunable(model)
    if scope == "global":
        if not isinstance(sparsity, float | int):
            raise ValueError("global magnitude pruning takes one sparsity for the whole model")
        flat = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
        keep = _keep_largest(flat, round(float(sparsity) * flat.numel()))
        masks, start = {}, 0
        for name, m in layers.items():
            n = m.weight.numel()
            masks[name] = keep[start:start + n].view_as(m.weight)
            start += n
        return masks
    if scope != "layer":
        raise ValueError(f"unknown pruning scope '{scope}' (global or layer)")
    amounts = sparsity if isinstance(sparsity, Mapping) else dict.fromkeys(layers, float(sparsity))
    unknown = sorted(set(amounts) - set(layers))
    if unknown:
        raise ValueError(f"no prunable layer named {unknown[:3]} in the model")
    return {name: _keep_largest(layers[name].weight.detach().abs(), round(s * layers[name].weight.numel()))
            for name, s in amounts.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place."""
    layers = prunable(model)
    for name, mask in masks.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def mask_gradients(model: nn.Module, masks: Masks) -> None:
    """Zero the gradients of pruned weights, so the optimizer's moments never move them."""
    layers = prunable(model)
    for name, mask in masks.items():
        grad = layers[name].weight.grad
        if grad is not None:
            grad.mul_(mask.to(grad.dtype))


def sparsity(masks: Masks) -> float:
    """The fraction of masked weights, over all masked layers together."""
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Achieved sparsity (fraction of exactly-zero weights) of each prunable layer."""
    return {name: 1 - int(torch.count_nonzero(m.weight)) / m.weight.numel() for name, m in prunable(model).items()}


def weight_sparsity(model: nn.Module) -> float:
    """Achieved sparsity over all prunable weights together."""
    layers = prunable(model).values()
    total = sum(m.weight.numel() for m in layers)
    return 1 - sum(int(torch.count_nonzero(m.weight)) for m in layers) / max(total, 1)
