"""Calibration sets and what is measured on them: per-layer sensitivity (output SQNR with only that layer
quantized), timestep-aware against single-timestep calibration, and the coverage of activation ranges.

A diffusion UNet meets very different activations at different steps of its sampler (Q-Diffusion): a
range calibrated on one step can miss what the others produce. The sd_unet kind's calibration batches
are one UNet call each, with a `timestep` input, so a single step is a filter over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from condenser.compress.quantize.fakequant import sqnr_db
from condenser.compress.quantize.layers import QUANTIZABLE, QuantConfig, QuantLayer, quantized_layers

Batch = dict[str, torch.Tensor]
Forward = Callable[[nn.Module, Batch], torch.Tensor]


def subsample(batches: Sequence[Batch], examples: int) -> list[Batch]:
    """About `examples` rows taken evenly from every batch (the first rows of each), so a small set
    still spans every timestep or every part of the data the batches come from."""
    per = max(1, math.ceil(examples / max(1, len(batches))))
    out, taken = [], 0
    for b in batches:
        if taken >= examples:
            break
        k = min(per, examples - taken)
        out.append({name: t[:k] for name, t in b.items()})
        taken += len(next(iter(out[-1].values())))
    return out


def timesteps(batches: Sequence[Batch]) -> list[int]:
    """The distinct timesteps of the batches in the order the sampler meets them."""
    seen: list[int] = []
    for b in batches:
        t = int(b["timestep"].reshape(-1)[0])
        if t not in seen:
            seen.append(t)
    return seen


def single_step(batches: Sequence[Batch], step: int) -> list[Batch]:
    """The batches of the sampler's `step`-th timestep only (0: the first, noisiest)."""
    order = timesteps(batches)
    if not 0 <= step < len(order):
        raise ValueError(f"step {step} is out of the sampler's {len(order)} steps")
    return [b for b in batches if int(b["timestep"].reshape(-1)[0]) == order[step]]


def layer_inputs(model: nn.Module, batches: Sequence[Batch], forward: Forward) -> dict[str, torch.Tensor]:
    """The input of every Conv2d/Linear of `model` over `batches`, concatenated along the batch."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(
        args[0].detach())) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, b)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def layer_sqnr(model: nn.Module, batches: Sequence[Batch], forward: Forward, config: QuantConfig) -> dict[str, float]:
    """Per Conv2d/Linear, the SQNR (dB) of its output when only it is quantized with `config` (its
    activation range calibrated on the same inputs), most sensitive first."""
    inputs = layer_inputs(model, batches, forward)
    result = {}
    with torch.no_grad():
        for name, x in inputs.items():
            layer = model.get_submodule(name)
            q = QuantLayer(layer, config)
            q.observe(x)
            q.finish_calibration()
            result[name] = sqnr_db(layer(x), q(x))
    return dict(sorted(result.items(), key=lambda kv: kv[1]))


def range_misses(full: nn.Module, partial: nn.Module) -> dict[str, float]:
    """Per quantized layer, the fraction of the activation range calibrated on everything (`full`) that
    the range calibrated on part of it (`partial`) does not cover: what a value outside is clipped to."""
    misses = {}
    parts = quantized_layers(partial)
    for name, m in quantized_layers(full).items():
        other = parts.get(name)
        if not isinstance(m, QuantLayer) or not isinstance(other, QuantLayer) or not hasattr(m, "input_range"):
            continue
        lo, hi = m.input_range
        plo, phi = other.input_range
        width = hi - lo
        misses[name] = max(0.0, (plo - lo) + (hi - phi)) / width if width > 0 else 0.0
    return misses
