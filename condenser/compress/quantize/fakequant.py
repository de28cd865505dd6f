"""Tensor-level quantization: integer grids, ranges (min-max, percentile, MSE-optimal), scales and zero
points, and fake quantization (quantize, round, clamp, dequantize in float, with a straight-through
gradient), the arithmetic every simulated layer and every exported scale comes from.

Conventions, as the runtimes use them (ONNX Runtime QDQ U8S8, XNNPACK):
- weights are signed: symmetric on [-(2^(b-1) - 1), 2^(b-1) - 1] with zero point 0, asymmetric on
  [-2^(b-1), 2^(b-1) - 1] with an integer zero point;
- activations are per tensor, asymmetric uint8 on [0, 2^b - 1] (what ONNX Runtime runs fastest on x86),
  or symmetric signed with zero point 0.
A scale and zero point map real x to q = clamp(round(x / scale) + zero_point, qmin, qmax) and back to
(q - zero_point) * scale; the real range [lo, hi] always contains 0, so 0 is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Range = Literal["minmax", "percentile", "mse"]
# Candidate clipping ratios of the min-max range for the MSE-optimal search (a grid, as in
# ORT's/TensorRT's entropy/MSE calibrators): 1.0 is min-max itself, so MSE is never worse than it.
_CLIPS = torch.linspace(0.3, 1.0, 36)


@dataclass(frozen=True)
class Grid:
    """An integer grid: `bits`, and whether it is signed and symmetric."""

    bits: int
    signed: bool
    symmetric: bool

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float) zero point mapping the real range [lo, hi] (widened to hold 0)
    onto `grid`; element-wise over any shape."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).eps
    if grid.symmetric:
        bound = torch.maximum(hi, -lo)
        if grid.signed:
            scale = (bound / grid.qmax).clamp_min(tiny)
            return scale, torch.zeros_like(scale)
        # Unsigned symmetric: the zero point sits mid-grid (uint8 128), as a signed grid shifted up.
        half = (grid.qmax + 1) // 2
        scale = (bound / (half - 1)).clamp_min(tiny)
        return scale, torch.full_like(scale, float(half))
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(tiny)
    zero_point = (grid.qmin - torch.round(lo / scale)).clamp(grid.qmin, grid.qmax)
    return scale, zero_point


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Quantize and dequantize `x` (scale and zero point broadcast against it). Rounding passes the
    gradient straight through, so scales and inputs can be tuned through it; clamping does not."""
    q = torch.clamp(_RoundSTE.apply(x / scale) + zero_point, grid.qmin, grid.qmax)
    return (q - zero_point) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The integers themselves (as int32): what a runtime stores and multiplies."""
    return torch.clamp(torch.round(x / scale) + zero_point, grid.qmin, grid.qmax).to(torch.int32)


def _search_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (rows: the leading dims of lo/hi), the clipping of [lo, hi] with the least squared
    fake-quantization error over the row's values."""
    best_err = best_lo = best_hi = None
    for c in _CLIPS:
        s, z = qparams(lo * c, hi * c, grid)
        err = ((fake_quant(x, s.unsqueeze(-1), z.unsqueeze(-1), grid) - x) ** 2).sum(-1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo * c, hi * c
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo * c, best_lo), torch.where(better, hi * c, best_hi)
    return best_lo, best_hi


def row_range(x: torch.Tensor, grid: Grid, method: Range,
              percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """The real range [lo, hi] of each row of 2-D `x` (one row per channel or group, or one row for a
    whole tensor): min-max, a percentile of the values (and 100 - it at the low end), or the clipping
    that minimises the squared quantization error."""
    x = x.detach().float()
    if method == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=x.dtype)
        bounds = torch.quantile(x, q, dim=-1) if x.shape[-1] <= 2 ** 24 else \
            torch.quantile(x[:, torch.randperm(x.shape[-1])[:2 ** 24]], q, dim=-1)
        return bounds[0], bounds[1]
    lo, hi = x.min(-1).values, x.max(-1).values
    if method == "mse":
        return _search_mse(x, lo, hi, grid)
    return lo, hi


def weight_qparams(weight: torch.Tensor, grid: Grid, group_size: int | None, method: Range,
                   percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of a weight (output channels first): per output channel when `group_size`
    is None, else per output channel and group of `group_size` input channels (all of a group's kernel
    taps share its scale). Shapes: (out,) or (out, in // group_size). A layer with fewer input channels
    than a group is quantized per output channel."""
    out, cin = weight.shape[:2]
    w = weight.detach().float()
    if group_size is None or cin <= group_size:
        lo, hi = row_range(w.reshape(out, -1), grid, method, percentile)
        return qparams(lo, hi, grid)
    if cin % group_size:
        raise ValueError(f"group size {group_size} does not divide the {cin} input channels")
    groups = cin // group_size
    rows = w.reshape(out, groups, -1).reshape(out * groups, -1)
    lo, hi = row_range(rows, grid, method, percentile)
    scale, zero_point = qparams(lo, hi, grid)
    return scale.reshape(out, groups), zero_point.reshape(out, groups)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """`weight` fake-quantized with the scales `weight_qparams` returned (per channel or per group)."""
    out, cin = weight.shape[:2]
    if scale.dim() == 1:
        shape = (out,) + (1,) * (weight.dim() - 1)
        return fake_quant(weight, scale.reshape(shape), zero_point.reshape(shape), grid)
    groups = scale.shape[1]
    w = weight.reshape(out, groups, -1)
    return fake_quant(w, scale.unsqueeze(-1), zero_point.unsqueeze(-1), grid).reshape(weight.shape)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|reference|^2 / |reference - approx|^2)."""
    reference, approx = reference.detach(), approx.detach()
    signal = float((reference.double() ** 2).sum())
    noise = float(((reference.double() - approx.double()) ** 2).sum())
    if noise == 0:
        return float("inf")
    return 10 * torch.log10(torch.tensor(signal / noise)).item() if signal > 0 else float("-inf")
