"""Winograd-domain quantization: the transforms, the exact Winograd convolution, the quantized layer, the
data-free tuning of its transform scales, and the in-place replacement of a model's eligible layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condenser.compress.quantize.fakequant import sqnr_db
from condenser.compress.quantize.layers import QuantConfig, QuantLayer, calibrate, quantize_
from condenser.compress.quantize.winograd import (
    INPUTS,
    WinogradLayer,
    eligible,
    input_sizes,
    layer_error,
    transforms,
    tune_scales_,
    winograd_,
    winograd_conv2d,
)
from condenser.models.editor import Generator, GeneratorConfig


def _calibrated(cin: int = 16, cout: int = 16, seed: int = 0) -> QuantLayer:
    """A seeded 3x3 conv, W8A8-quantized and calibrated on random activations."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))
    quantize_(model, QuantConfig())
    calibrate(model, [torch.randn(4, cin, 12, 12)], lambda m, b: m(b))
    return model[0]


def _standard(layer: WinogradLayer) -> WinogradLayer:
    """The layer with the unscaled transforms (a = b = 1), as built without the equalizing start."""
    with torch.no_grad():
        layer.log_g.zero_()
        layer.log_b.zero_()
    return layer


def test_transforms_are_the_known_matrices():
    at, g, bt = transforms(2)
    known_bt = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
    # Up to each row's scale (and the matching scale of G's row): rows are parallel.
    for row, known in zip(bt, known_bt):
        assert torch.allclose(row * (known @ row) / (row @ row), known)
    assert torch.equal(at, torch.tensor([[1, 1, 1, 0], [0, 1, -1, 1]], dtype=torch.float64))
    at, g, bt = transforms(4)  # Lavin & Gray's F(4,3), exactly
    assert torch.equal(bt[0], torch.tensor([4, 0, -5, 0, 1, 0], dtype=torch.float64))
    assert torch.equal(bt[-1], torch.tensor([0, 4, 0, -5, 0, 1], dtype=torch.float64))
    assert torch.allclose(g[1], torch.full((3,), -1 / 6, dtype=torch.float64))
    assert torch.equal(at[-1], torch.tensor([0, 1, -1, 8, -8, 1], dtype=torch.float64))


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transforms_compute_the_correlation(m):
    at, g, bt = transforms(m)
    assert at.dtype == torch.float64 and at.shape == (m, m + 2) and g.shape == (m + 2, 3) and bt.shape == (m + 2,) * 2
    weight, d = torch.randn(3, dtype=torch.float64), torch.randn(m + 2, dtype=torch.float64)
    direct = torch.stack([weight @ d[i:i + 3] for i in range(m)])
    assert torch.allclose(at @ ((g @ weight) * (bt @ d)), direct, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape,padding", [((13, 11), 1), ((16, 16), 1), ((9, 7), 0), ((5, 10), (1, 0))])
def test_winograd_conv2d_equals_conv2d(m, shape, padding):
    torch.manual_seed(m)
    x, weight, bias = torch.randn(2, 8, *shape), torch.randn(5, 8, 3, 3) * 0.3, torch.randn(5)
    direct = F.conv2d(x, weight, bias, padding=padding)
    y = winograd_conv2d(x, weight, bias, m, padding)
    assert y.shape == direct.shape and y.dtype == torch.float32
    assert (y - direct).abs().max() < 1e-4
    no_bias = winograd_conv2d(x, weight, None, m, padding)
    assert (no_bias - F.conv2d(x, weight, None, padding=padding)).abs().max() < 1e-4


@pytest.mark.parametrize("m", [4, 6])
def test_at_16_bits_the_layer_is_the_direct_convolution(m):
    layer = _calibrated()
    wino = WinogradLayer(layer, m, weight_bits=16, activation_bits=16)
    x = torch.randn(2, 16, 11, 9)
    with torch.no_grad():
        direct = F.conv2d(layer.quantize_input(x), layer.inner.weight, layer.inner.bias, padding=1)
        y = wino(x)
        assert y.shape == direct.shape
        # Closer than the direct W8A8 layer's own weight rounding (48 dB here).
        assert sqnr_db(direct, y) > 55 and sqnr_db(direct, y) > sqnr_db(direct, layer(x)) + 5
    assert layer_error(wino, 2, 0) < 1e-4 * float(direct.var())


def test_at_8_bits_f63_loses_more_than_f43():
    layer = _calibrated()
    errors = {m: layer_error(WinogradLayer(layer, m), 4, 0) for m in (2, 4, 6)}
    assert all(0 < e < float("inf") for e in errors.values())
    assert errors[2] < errors[4] < errors[6]
    # The requantized product is where the taps' ranges bite: with the unscaled transforms it is far worse.
    assert layer_error(_standard(WinogradLayer(layer, 4)), 4, 0) > 10 * errors[4]


@pytest.mark.parametrize("m", [4, 6])
def test_tuning_lowers_the_error(m):
    layer = _calibrated(seed=m)
    model = nn.Sequential(_standard(WinogradLayer(layer, m)))  # the paper's start: the unscaled transforms
    before = layer_error(model[0], 2, 1)
    report = tune_scales_(model, steps=60, lr=0.05, batch=2)["0"]
    assert report["mse_before"] == pytest.approx(before) and report["kept"]
    assert report["mse_after"] < 0.2 * before
    assert layer_error(model[0], 2, 1) == pytest.approx(report["mse_after"])
    # From the equalizing start, tuning keeps only what helps on held-out random inputs.
    equalized = WinogradLayer(layer, m)
    start = layer_error(equalized, 2, 1)
    assert start < 0.2 * before
    result = equalized.tune(steps=60, lr=0.05, batch=2, seed=0)
    assert result["mse_after"] <= start and layer_error(equalized, 2, 1) == pytest.approx(result["mse_after"])


def test_scales_keep_the_exact_result():
    layer = WinogradLayer(_calibrated(), 4)
    at, g, bt = layer.scaled_transforms()
    assert not torch.allclose(g, transforms(4)[1])
    weight, d = torch.randn(3, 3, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    direct = F.conv2d(d[None, None], weight[None, None])[0, 0]
    assert torch.allclose(at @ ((g @ weight @ g.T) * (bt @ d @ bt.T)) @ at.T, direct, atol=1e-10)
    # Without requantizing the product, the scales change nothing: U's and V's per-tap scales follow them.
    exact = WinogradLayer(_calibrated(), 4, quantize_product=False)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        y = exact(x)
        exact.log_g.add_(torch.linspace(-1, 1, 6))
        assert torch.allclose(exact(x), y, atol=1e-4)


def test_tuning_reads_no_data(monkeypatch):
    model = nn.Sequential(WinogradLayer(_calibrated(), 4), nn.ReLU(), WinogradLayer(_calibrated(seed=1), 6))
    twin = copy.deepcopy(model)

    def refuse(*args, **kwargs):
        raise AssertionError("tuning touched data or ran the model")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", refuse)
    monkeypatch.setattr(nn.Sequential, "forward", refuse)
    seen = []
    for layer in (model[0], model[2]):
        layer.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    report = tune_scales_(model, steps=10, lr=0.05, batch=2, seed=3)
    assert seen and set(seen) == {(2, 16, 16, 16)}  # the layers' own random batches, nothing else
    assert set(report) == {"0", "2"}
    assert all(r["inputs"] == INPUTS == "uniform in calibrated range" for r in report.values())
    assert report["0"]["input_shape"] == [2, 16, 16, 16]
    # Only its own seeded random inputs: the same model tunes to the same scales.
    again = tune_scales_(twin, steps=10, lr=0.05, batch=2, seed=3)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in report.values()] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in again.values()]
    assert torch.equal(model[0].log_g, twin[0].log_g) and torch.equal(model[2].log_b, twin[2].log_b)


def _editor() -> Generator:
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(("bold",), channels=8, blocks=1, block="resnet", code_dim=8,
                                          default="bold")).eval()
    with torch.no_grad():  # a trained editor's output conv is not zero
        generator.out.weight.normal_(0, 0.1)
    return generator


def test_winograd_replaces_only_eligible_layers():
    dense = _editor()
    model = quantize_(copy.deepcopy(dense), QuantConfig())
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    calibrate(model, [images], lambda m, b: m(b))
    sizes = input_sizes(model, lambda: model(images[:1]))
    assert sizes["stem"] == (16, 16) and sizes["blocks.0.conv1"] == (4, 4) and "down1" not in sizes
    names = winograd_(model, 4, sizes=sizes)
    assert names == ["stem", "blocks.0.conv1", "blocks.0.conv2", "up1", "up2", "out"]
    assert all(isinstance(model.get_submodule(n), WinogradLayer) for n in names)
    assert model.get_submodule("blocks.0.conv1").size == (4, 4)
    for stays in ("down1", "down2", "blocks.0.film"):  # 4x4 stride 2, Linear
        assert isinstance(model.get_submodule(stays), QuantLayer) and not eligible(model.get_submodule(stays))
    assert not eligible(nn.Conv2d(4, 4, 1)) and not eligible(nn.Conv2d(4, 4, 3, stride=2))
    assert not eligible(nn.Conv2d(4, 4, 3, padding=2, dilation=2)) and not eligible(nn.Conv2d(4, 4, 3, groups=2))
    assert not eligible(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")) and eligible(nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        y, reference = model(images), dense(images)
    assert y.shape == reference.shape and torch.isfinite(y).all()
    assert F.mse_loss(y, reference) < 0.05 * float(reference.var())


def test_groups_and_their_errors():
    layer = _calibrated(cin=32)
    assert layer_error(WinogradLayer(layer, 4, group_size=8), 2, 0) < layer_error(WinogradLayer(layer, 4), 2, 0)
    with pytest.raises(ValueError, match="does not divide"):
        WinogradLayer(layer, 4, group_size=12)
    zero = _calibrated()
    with torch.no_grad():
        zero.inner.weight.zero_()  # an untrained editor's output conv: the tap scales stay finite
    silent = WinogradLayer(zero, 6)
    assert torch.isfinite(silent.tap_scales()).all() and layer_error(silent, 2, 0) == 0
    with pytest.raises(ValueError, match="3x3"):
        WinogradLayer(QuantLayer(nn.Conv2d(4, 4, 1), QuantConfig()), 4)
