"""Simulated quantization: integer grids and ranges, `quantize_` and calibration, sensitivity, timestep-aware
calibration, and the params that drive them. Quality on the real deliverables is bench/quantize.py's job."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from condenser.compress.quantize.calibrate import layer_sqnr, range_misses, single_step, subsample, timesteps
from condenser.compress.quantize.fakequant import Grid, fake_quant, qparams, row_range, sqnr_db, weight_qparams
from condenser.compress.quantize.layers import (
    HalfLayer,
    QuantConfig,
    QuantLayer,
    calibrate,
    quantize_,
    quantized_bytes,
    quantized_layers,
)
from condenser.core.config import parse_params
from condenser.core.errors import ConfigError
from tests.conftest import tiny_params


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed, symmetric", [(True, True), (True, False), (False, False), (False, True)])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, signed, symmetric):
    x = torch.randn(4096) * 3 + (0 if signed else 1.5)
    grid = Grid(bits, signed=signed, symmetric=symmetric)
    scale, zp = qparams(x.min(), x.max(), grid)
    assert float(zp) == round(float(zp)) and grid.qmin <= float(zp) <= grid.qmax
    err = (fake_quant(x, scale, zp, grid) - x).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-6
    # Zero is exact (padding and ReLU zeros stay zero).
    assert float(fake_quant(torch.zeros(1), scale, zp, grid)) == 0.0
    # Out of range clips to the end of the grid.
    assert float(fake_quant(x.max() * 10, scale, zp, grid)) == pytest.approx(float((grid.qmax - zp) * scale))


def test_mse_and_percentile_ranges_clip_outliers_and_mse_is_never_worse_than_minmax():
    torch.manual_seed(0)
    x = torch.randn(1, 20000)
    x[0, 0] = 60.0  # one outlier stretches min-max
    grid = Grid(8, signed=True, symmetric=True)
    errors, highs = {}, {}
    for method in ("minmax", "percentile", "mse"):
        lo, hi = row_range(x, grid, method)
        s, z = qparams(lo, hi, grid)
        errors[method], highs[method] = float(((fake_quant(x, s[:, None], z[:, None], grid) - x) ** 2).mean()), hi
    assert errors["mse"] <= errors["minmax"]
    # The percentile range ignores the outlier (the bulk gets a finer step, the outlier is clipped).
    assert float(highs["percentile"]) < 10 < float(highs["minmax"])


def test_group_wise_beats_per_channel_and_per_tensor_on_an_outlier_input_channel():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    with torch.no_grad():
        layer.weight[:, 5] *= 40  # one input channel's weights are large in every output row
    x = torch.randn(256, 64)
    grid = Grid(4, signed=True, symmetric=False)
    ref = layer(x)

    def sqnr(group):
        q = QuantLayer(layer, QuantConfig(weight_bits=4, activation_bits=None, group_size=group, symmetric=False))
        return sqnr_db(ref, q(x))

    lo, hi = row_range(layer.weight.reshape(1, -1), grid, "minmax")
    s, z = qparams(lo, hi, grid)
    per_tensor = sqnr_db(ref, nn.functional.linear(x, fake_quant(layer.weight, s, z, grid), layer.bias))
    assert sqnr(16) > sqnr(None) + 3 and sqnr(None) > per_tensor
    # Scales per output channel and group.
    assert weight_qparams(layer.weight, grid, 16, "minmax")[0].shape == (16, 4)
    with pytest.raises(ValueError, match="does not divide"):
        weight_qparams(layer.weight, grid, 24, "minmax")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 3, 1))


def _forward(model, batch):
    return model(batch["x"])


def test_quantize_calibrate_and_fallback():
    model = _net()
    batches = [{"x": torch.randn(8, 3, 12, 12)} for _ in range(3)]
    x = torch.randn(16, 3, 12, 12)
    sim = quantize_(copy.deepcopy(model), QuantConfig(), fallback={"2": None})
    assert isinstance(sim[2], HalfLayer) and isinstance(sim[0], QuantLayer) and set(quantized_layers(sim)) == {
        "0", "2", "4"}
    with pytest.raises(RuntimeError, match="calibrate"):
        sim(x)
    assert calibrate(sim, batches, _forward) == 3
    assert sqnr_db(model(x), sim(x)) > 30
    # 8-bit weights are about a quarter of the float32 bytes; 4-bit about an eighth (plus scales).
    w8 = quantize_(copy.deepcopy(model), QuantConfig())
    w4 = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=4, group_size=8, symmetric=False))
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert quantized_bytes(w4) < quantized_bytes(w8) < 0.4 * fp32
    with pytest.raises(ValueError, match="no Conv2d/Linear layer"):
        quantize_(copy.deepcopy(model), QuantConfig(), fallback={"nope": None})


def test_layer_sqnr_is_sorted_and_tracks_the_bits():
    batches = [{"x": torch.randn(8, 3, 12, 12)}]
    model = _net()
    w4 = layer_sqnr(model, batches, _forward, QuantConfig(weight_bits=4, activation_bits=None))
    w8 = layer_sqnr(model, batches, _forward, QuantConfig(weight_bits=8, activation_bits=None))
    assert list(w4.values()) == sorted(w4.values()) and set(w4) == {"0", "2", "4"}
    # About 6 dB per bit: 4 more bits, well over 15 dB more on every layer.
    assert all(w8[n] > w4[n] + 15 for n in w4)


class _TimeNet(nn.Module):
    """A layer whose input grows with the timestep, as a UNet's activations differ across its sampler."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample * (1 + timestep[:, None, None, None] / 100))


def test_timestep_aware_calibration_sees_ranges_one_step_misses():
    torch.manual_seed(0)
    model = _TimeNet()
    # As the sd_unet kind yields them: one batch per sampler step, first step (t=999) first.
    batches = [{"sample": torch.randn(4, 2, 8, 8), "timestep": torch.full((4,), t)} for t in (999, 666, 333, 0)] * 2
    assert timesteps(batches) == [999, 666, 333, 0]
    last = single_step(batches, 3)
    assert len(last) == 2 and all(int(b["timestep"][0]) == 0 for b in last)
    with pytest.raises(ValueError, match="out of the sampler's 4 steps"):
        single_step(batches, 4)

    def forward(m, b):
        return m(b["sample"], b["timestep"])

    full = quantize_(copy.deepcopy(model), QuantConfig())
    calibrate(full, batches, forward)
    one = quantize_(copy.deepcopy(model), QuantConfig())
    calibrate(one, last, forward)
    assert range_misses(full, one)["conv"] > 0.5
    # On the first step's inputs the single-step ranges clip: the timestep-aware model is closer.
    first = batches[0]
    ref = forward(model, first)
    assert sqnr_db(ref, forward(full, first)) > sqnr_db(ref, forward(one, first)) + 3
    assert sum(len(b["sample"]) for b in subsample(batches, 8)) == 8


@pytest.mark.parametrize("patch, key", [
    ({"schemes": {"w8a8": {"weight_bits": 6}}}, "quantize.schemes.w8a8.weight_bits"),
    ({"schemes": {"w8a8": {"activation_bits": 4}}}, "quantize.schemes.w8a8.activation_bits"),
    ({"runtimes": ["tflite"]}, "quantize.runtimes"),
    ({"deploy": "w4a8_g4"}, "quantize.deploy"),
    ({"winograd": {"tiles": [3]}}, "quantize.winograd.tiles"),
    ({"timestep": {"schemes": ["nope"]}}, "quantize.timestep.schemes"),
    ({"schemes": {"w8a8": {}, "x": {"deliverables": ["ghost"]}}}, "quantize.schemes.x.deliverables"),
])
def test_bad_quantize_params_are_refused_naming_the_key(patch, key):
    raw = tiny_params()
    section = raw["quantize"]
    for k, v in patch.items():
        if k == "schemes":
            section["schemes"] = {**section["schemes"], **{n: {**section["schemes"].get(n, {}), **s}
                                                           for n, s in v.items()}}
        elif isinstance(v, dict):
            section[k] = {**section.get(k, {}), **v}
        else:
            section[k] = v
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert key in str(err.value).replace(" -> ", ".").replace("\n  ", "\n")
