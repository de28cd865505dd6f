"""What every model family shares."""

from __future__ import annotations

from torch import nn


def parameter_count(module: nn.Module, trainable: bool = False) -> int:
    """All parameters, or (trainable=True) only those that train."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
