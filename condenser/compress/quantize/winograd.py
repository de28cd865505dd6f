"""Winograd-domain quantization of 3x3 convolutions, with data-free tuning of the transforms' scales.

A 3x3 stride-1 convolution runs as Winograd F(m, 3) (m in {2, 4, 6}): per output tile of m x m,
    Y = Aᵀ [ Σ_cin (G g Gᵀ) ⊙ (Bᵀ d B) ] A
over input tiles d of α x α, α = m + 2, overlapping by 2: one GEMM per tap (each of the α x α positions)
over the input channels, then the output transform, a GEMM over the α² taps. The integer kernel simulated
here (fake quantization, in float, with exactly its scales; "Data-Free Group-Wise Fully Quantized Winograd
Convolution via Learnable Scales", Pan et al., CVPR 2025):
- the input d: the layer's own calibrated input quantizer (uint8, as the direct W8A8 layer);
- U = G g Gᵀ transformed offline from the float weight, int8 per tap, output channel and group of
  `group_size` input channels (None: all of a tap's input channels);
- V = Bᵀ d B: int8, dynamic, per tap, tile and the same groups of input channels (the GEMMs' reduction),
  so no range of V is guessed: a range frozen from random inputs clips real ones;
- M = Σ_cin U ⊙ V: int32 accumulation per group, rescaled by the group's two scales;
- with `quantize_product`, M requantized to int8, dynamic, one scale per output channel and tile shared by
  its α² taps (the output transform's reduction: an integer GEMM takes no scale varying along it; a fused
  kernel holds a tile's taps in registers, so the max is cheap); else kept at that precision;
- Y = Aᵀ M A accumulated in int32 (F(6,3)'s fractional Aᵀ as fixed point), rescaled; bias in float.

M's taps differ in range by orders of magnitude (a "cross"), so one scale across them is very lossy.
Scaling the transforms, G' = diag(a) G and B' = B diag(b) with Aᵀ' = Aᵀ diag(1 / (a ⊙ b)), leaves the exact
result unchanged but rebalances the taps of M' = M ⊙ c cᵀ (c = a ⊙ b). a and b (exp of tuned logs) start
where M's tap ranges are equal on a seeded random batch and are tuned with Adam to bring the layer's
output to the float direct convolution's of the same quantized input, on random inputs only: uniform in
the layer's calibrated input range, through its input quantizer. No data is read. U's and V's scales are
per tap, so they scale with a and b and their quantization is invariant: a and b act through c alone, where
M is requantized, and without `quantize_product` they change nothing.

    quantize_(model, QuantConfig()); calibrate(model, batches, forward)
    sizes = input_sizes(model, lambda: forward(model, batch))
    winograd_(model, m=4, sizes=sizes)
    report = tune_scales_(model, steps=100, lr=0.05)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from itertools import count, islice

import torch
import torch.nn.functional as F
from torch import nn

from condenser.compress.quantize.fakequant import Grid, fake_quant, qparams
from condenser.compress.quantize.layers import QuantLayer

# Random inputs are drawn at this spatial size when winograd_ is not told a layer's real one.
DEFAULT_SIZE = (16, 16)
# Images in the seeded random batch the tap scales start from.
_INIT_BATCH = 4
# Random batches tuning cycles through.
_POOL = 8
INPUTS = "uniform in calibrated range"


def _points() -> Iterator[float]:
    """Finite interpolation points in the standard order: 0, ±1, ±2, ±1/2, ±3, ±1/3, ... (small values
    keep the transforms' entries small)."""
    yield 0.0
    yield from (1.0, -1.0)
    for k in count(2):
        yield from (float(k), float(-k), 1 / k, -1 / k)


def _poly(roots: torch.Tensor, length: int) -> torch.Tensor:
    """Coefficients (ascending powers, zero-padded to `length`) of prod (x - root)."""
    coeffs = torch.ones(1, dtype=torch.float64)
    for root in roots:
        coeffs = torch.cat([coeffs.new_zeros(1), coeffs]) - root * torch.cat([coeffs, coeffs.new_zeros(1)])
    return F.pad(coeffs, (0, length - len(coeffs)))


def transforms(m: int, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aᵀ (m x α), G (α x r) and Bᵀ (α x α) of Winograd F(m, r), float64, by the Cook-Toom construction
    (Lavin & Gray) on α - 1 finite points and infinity. The correlation y = Aᵀ [(G g) ⊙ (Bᵀ d)] is the
    transpose of the polynomial product g·h = V⁻¹ [(V_r g) ⊙ (V_m h)] (V: evaluation at the points, and
    the top coefficient at infinity). Bᵀ's rows are scaled to the point's prod_{l≠j} (x - p_l), G's by
    the inverse: Lavin's F(4,3) matrices exactly."""
    alpha = m + r - 1
    pts = torch.tensor(list(islice(_points(), alpha - 1)), dtype=torch.float64)
    powers = torch.arange(max(m, r), dtype=torch.float64)
    vander = pts[:, None] ** powers  # 0^0 = 1
    others = [torch.cat([pts[:j], pts[j + 1:]]) for j in range(alpha - 1)]
    f = torch.stack([(pts[j] - rest).prod() for j, rest in enumerate(others)])
    bt = torch.stack([_poly(rest, alpha) for rest in others] + [_poly(pts, alpha)])
    infinity = torch.zeros(1, max(m, r), dtype=torch.float64)
    g = torch.cat([vander[:, :r] / f[:, None], infinity[:, :r]])
    g[-1, r - 1] = 1.0
    at = torch.cat([vander[:, :m], infinity[:, :m]]).T.contiguous()
    at[m - 1, -1] = 1.0
    return at, g, bt


def _pair(padding: int | tuple[int, int]) -> tuple[int, int]:
    return (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))


def _tiles(x: torch.Tensor, m: int, padding: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Overlapping α x α input tiles [N, C, th, tw, α, α] (a view of the zero-padded input, padded on the
    bottom/right to whole tiles) and the output's size."""
    ph, pw = padding
    ho, wo = x.shape[2] + 2 * ph - 2, x.shape[3] + 2 * pw - 2
    th, tw = math.ceil(ho / m), math.ceil(wo / m)
    x = F.pad(x, (pw, pw + tw * m - wo, ph, ph + th * m - ho))
    return x.unfold(2, m + 2, m).unfold(3, m + 2, m), (ho, wo)


def _input_transform(tiles: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """V = Bᵀ d B per tile, laid out per tap for the GEMMs: [α², C, N·th·tw]."""
    v = torch.tensordot(bt, tiles.permute(4, 5, 1, 0, 2, 3), dims=([1], [0]))  # rows: [α, α(cols), C, N, th, tw]
    v = torch.tensordot(bt, v, dims=([1], [1]))  # cols: [α(cols), α(rows), C, N, th, tw]
    return v.transpose(0, 1).reshape(bt.shape[0] ** 2, tiles.shape[1], -1)


def _weight_transform(weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """U = G g Gᵀ per output and input channel, laid out per tap: [α², Cout, Cin]."""
    u = g @ weight @ g.T
    return u.permute(2, 3, 0, 1).reshape(g.shape[0] ** 2, *weight.shape[:2])


def _output_transform(product: torch.Tensor, at: torch.Tensor, tiles: torch.Size,
                      size: tuple[int, int]) -> torch.Tensor:
    """Y = Aᵀ M A per tile from M [α², Cout, N·th·tw], assembled to [N, Cout, ho, wo]."""
    m, alpha = at.shape
    n, _, th, tw = tiles[:4]
    y = torch.tensordot(at, product.reshape(alpha, alpha, -1, n, th, tw), dims=([1], [0]))  # [m, α, Cout, ...]
    y = torch.tensordot(at, y, dims=([1], [1]))  # [m(cols), m(rows), Cout, N, th, tw]
    y = y.permute(3, 2, 4, 1, 5, 0).reshape(n, -1, th * m, tw * m)
    return y[:, :, :size[0], :size[1]]


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int,
                    padding: int | tuple[int, int]) -> torch.Tensor:
    """A 3x3 convolution (stride 1, dilation 1, groups 1) computed as Winograd F(m, 3), in x's precision,
    unquantized: the reference the quantized layer's transforms and tiling are checked against."""
    at, g, bt = (t.to(x.dtype) for t in transforms(m))
    tiles, size = _tiles(x, m, _pair(padding))
    product = torch.bmm(_weight_transform(weight.to(x.dtype), g), _input_transform(tiles, bt))
    y = _output_transform(product, at, tiles.shape, size)
    return y if bias is None else y + bias[:, None, None]


def _conv(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, QuantLayer) else module


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    return (1, 1) if conv.padding == "same" else _pair(conv.padding)


def eligible(module: nn.Module) -> bool:
    """Whether Winograd F(m, 3) computes this layer: a Conv2d (or QuantLayer around one), 3x3, stride 1,
    dilation 1, groups 1, zero padding."""
    conv = _conv(module)
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _symmetric(bits: int) -> Grid:
    return Grid(bits, signed=True, symmetric=True)


def _groups(cin: int, group_size: int | None) -> int:
    """How many groups of `group_size` input channels (None, or more than the layer has: one group)."""
    if group_size is None or cin <= group_size:
        return 1
    if cin % group_size:
        raise ValueError(f"group size {group_size} does not divide the {cin} input channels")
    return cin // group_size


def _quantize_groups(t: torch.Tensor, dim: int, groups: int, grid: Grid) -> torch.Tensor:
    """`t` fake-quantized with one min-max scale per group of `dim` (split into `groups` equal parts) and
    index of the other dims. The scale is differentiable in `t`: a tap scaled up costs its group."""
    rows = t.reshape(*t.shape[:dim], groups, t.shape[dim] // groups, *t.shape[dim + 1:])
    scale, zero_point = qparams(rows.amin(dim + 1, keepdim=True), rows.amax(dim + 1, keepdim=True), grid)
    return fake_quant(rows, scale, zero_point, grid).reshape(t.shape)


class WinogradLayer(nn.Module):
    """A calibrated 3x3 QuantLayer computed as a quantized Winograd F(m, 3) kernel (see the module
    docstring): same input, same output, the layer's own input quantizer, bias in float. The weight is
    transformed and quantized once, here. `log_g` and `log_b` (the logs of a and b) start equalizing M's
    tap ranges on a random batch drawn with `seed`, and are what tune_scales_ tunes; `size` is the spatial
    size of the layer's random inputs (its real input size, ideally)."""

    def __init__(self, layer: QuantLayer, m: int, weight_bits: int = 8, activation_bits: int = 8,
                 group_size: int | None = None, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE,
                 quantize_product: bool = True):
        super().__init__()
        if not isinstance(layer, QuantLayer) or not eligible(layer):
            raise ValueError(f"not a QuantLayer around a 3x3 stride-1 convolution: {layer}")
        if layer.config.activation_grid is None or not hasattr(layer, "input_range"):
            raise ValueError("the layer needs a calibrated input range (an activation-quantized, calibrated "
                             "QuantLayer): it is where the random tuning inputs are drawn")
        self.inner, self.config, self.m = layer.inner, layer.config, m
        self.size = (int(size[0]), int(size[1]))
        self.padding = _padding(layer.inner)
        self.input_range = layer.input_range
        self.register_buffer("input_scale", layer.input_scale.detach().clone())
        self.register_buffer("input_zero_point", layer.input_zero_point.detach().clone())
        self.weight_grid, self.activation_grid = _symmetric(weight_bits), _symmetric(activation_bits)
        self.group_size, self.quantize_product = group_size, quantize_product
        self.groups = _groups(layer.inner.in_channels, group_size)
        at, g, bt = transforms(m)
        self.register_buffer("at", at.float())
        self.register_buffer("bt", bt.float())
        u = _weight_transform(layer.inner.weight.detach().double(), g).float()
        self.register_buffer("weight_t", _quantize_groups(u, 2, self.groups, self.weight_grid))
        self.log_g = nn.Parameter(torch.zeros(m + 2))
        self.log_b = nn.Parameter(torch.zeros(m + 2))
        self._equalize(seed)

    @torch.no_grad()
    def _equalize(self, seed: int) -> None:
        """Start c = a ⊙ b where M's tap ranges R are equal, c_i c_j R_ij = const: log R_ij fitted as ρ_i + ρ_j
        (the ranges are near separable; ρ centred, so c's geometric mean is 1) on one seeded random batch,
        c = exp(-ρ), shared evenly by a and b. Taps that are (near) zero are floored, not blown up."""
        x = self.quantize_input(self.random_input(_INIT_BATCH, torch.Generator().manual_seed(seed)))
        ranges = self._product(x)[0].abs().amax((1, 2))
        log_range = ranges.clamp_min(float(ranges.max()) * 1e-4 + torch.finfo(torch.float32).tiny).log()
        log_range = log_range.reshape(self.m + 2, self.m + 2)
        rho = (log_range.mean(0) + log_range.mean(1)) / 2
        self.log_g.copy_(-(rho - rho.mean()) / 2)
        self.log_b.copy_(-(rho - rho.mean()) / 2)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.input_scale, self.input_zero_point, self.config.activation_grid)

    def random_input(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Inputs uniform in the calibrated input range, at `size`: all tuning ever feeds the layer."""
        lo, hi = self.input_range
        x = torch.rand(batch, self.inner.in_channels, *self.size, generator=generator)
        return (lo + (hi - lo) * x).to(self.weight_t.device)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The float direct convolution, bias included."""
        return F.conv2d(x, self.inner.weight, self.inner.bias, padding=self.padding)

    def tap_scales(self) -> torch.Tensor:
        """c = a ⊙ b: M's taps are scaled by c cᵀ and Aᵀ's columns by 1 / c."""
        return torch.exp(self.log_g + self.log_b)

    def scaled_transforms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aᵀ', G' and Bᵀ' (float64) as a kernel would use them: Aᵀ diag(1/(a⊙b)), diag(a) G, diag(b) Bᵀ."""
        at, g, bt = transforms(self.m)
        a, b = (torch.exp(p.detach().double().cpu()) for p in (self.log_g, self.log_b))
        return at / (a * b), a[:, None] * g, b[:, None] * bt

    def _product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size, tuple[int, int]]:
        """Σ_cin U ⊙ V [α², Cout, tiles] from the quantized input: the per-tap GEMMs, rescaled per group."""
        tiles, size = _tiles(x, self.m, self.padding)
        v = _quantize_groups(_input_transform(tiles, self.bt), 1, self.groups, self.activation_grid)
        return torch.bmm(self.weight_t, v), tiles.shape, size

    def _finish(self, product: torch.Tensor, tiles: torch.Size, size: tuple[int, int]) -> torch.Tensor:
        """M ⊙ c cᵀ (requantized per output channel and tile) through Aᵀ diag(1/c): the output, bias excluded."""
        c = self.tap_scales()
        product = product * torch.outer(c, c).reshape(-1, 1, 1)
        if self.quantize_product:
            product = _quantize_groups(product, 0, 1, self.activation_grid)
        return _output_transform(product, self.at / c, tiles, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._finish(*self._product(self.quantize_input(x)))
        return y if self.inner.bias is None else y + self.inner.bias[:, None, None]

    def tune(self, steps: int, lr: float, batch: int, seed: int) -> dict:
        """Adam on log a and log b against the float direct convolution of the same quantized input, cycling
        through `_POOL` random batches (what precedes the requantization of M is computed once a batch; it
        does not depend on a and b). Kept only if the error on a held-out random batch drops."""
        start = time.perf_counter()
        before = layer_error(self, batch, seed + 1)
        saved = [p.detach().clone() for p in (self.log_g, self.log_b)]
        generator = torch.Generator().manual_seed(seed)
        pool = []
        with torch.no_grad():
            for _ in range(min(steps, _POOL)):
                x = self.quantize_input(self.random_input(batch, generator))
                pool.append((F.conv2d(x, self.inner.weight, None, padding=self.padding), *self._product(x)))
        optimizer = torch.optim.Adam([self.log_g, self.log_b], lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                target, product, tiles, size = pool[step % len(pool)]
                loss = F.mse_loss(self._finish(product, tiles, size), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.log_g.grad = self.log_b.grad = None
        after = layer_error(self, batch, seed + 1)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for p, old in zip((self.log_g, self.log_b), saved):
                    p.copy_(old)
            after = before
        return {"mse_before": before, "mse_after": after, "kept": kept, "inputs": INPUTS,
                "input_shape": [batch, self.inner.in_channels, *self.size], "batches": len(pool), "steps": steps,
                "lr": lr, "tap_scales": [round(v, 4) for v in self.tap_scales().tolist()],
                "seconds": round(time.perf_counter() - start, 3)}

    def extra_repr(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "c"
        product = f"m{self.activation_grid.bits}" if self.quantize_product else "m32"
        return f"F({self.m},3) w{self.weight_grid.bits}{group}a{self.activation_grid.bits}{product}, size={self.size}"


def layer_error(layer: WinogradLayer, batch: int, seed: int) -> float:
    """Mean squared error of the layer's output against the float direct convolution of the same (quantized)
    input, on seeded random inputs uniform in its calibrated range: the error the Winograd kernel adds."""
    x = layer.random_input(batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float(F.mse_loss(layer(x), layer.reference(layer.quantize_input(x))))


def input_sizes(model: nn.Module, run: Callable[[], object]) -> dict[str, tuple[int, int]]:
    """The spatial size of each eligible QuantLayer's input during `run()` (one forward of the model): the
    size winograd_ draws each layer's random inputs at."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str, args: tuple) -> None:
        sizes.setdefault(name, (int(args[0].shape[-2]), int(args[0].shape[-1])))

    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: record(name, args))
             for name, module in model.named_modules() if isinstance(module, QuantLayer) and eligible(module)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def winograd_(model: nn.Module, m: int, weight_bits: int = 8, activation_bits: int = 8,
              group_size: int | None = None, seed: int = 0, sizes: Mapping[str, tuple[int, ...]] | None = None,
              quantize_product: bool = True) -> list[str]:
    """Replace, in place, every eligible QuantLayer of a quantize_'d and calibrated model by a WinogradLayer;
    `sizes`: each layer's input size ((H, W), or a shape ending in them; input_sizes gives them), else
    DEFAULT_SIZE. Returns the replaced layers' names."""
    names = []
    for name, module in list(model.named_modules()):
        if not (isinstance(module, QuantLayer) and eligible(module)):
            continue
        size = tuple(sizes[name][-2:]) if sizes and name in sizes else DEFAULT_SIZE
        layer = WinogradLayer(module, m, weight_bits, activation_bits, group_size, seed, size=size,
                              quantize_product=quantize_product)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        names.append(name)
    return names


def tune_scales_(model: nn.Module, steps: int, lr: float, batch: int = 4, seed: int = 0) -> dict[str, dict]:
    """Tune every WinogradLayer's transform scales in place, data-free: only random inputs the layers draw
    themselves (model's forward is never called). Returns per layer its error before and after, and how."""
    return {name: module.tune(steps, lr, batch, seed) for name, module in model.named_modules()
            if isinstance(module, WinogradLayer)}
