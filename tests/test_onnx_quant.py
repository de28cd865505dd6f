"""condenser.runtime.onnx_quant on tiny models: the U8S8 QDQ file carries the simulation's scales and runs
what was simulated, schemes it cannot hold are refused, float layers stay float."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from condenser.compress.quantize.layers import QuantConfig, QuantLayer, calibrate, quantize_
from condenser.runtime.onnx import export_onnx, session
from condenser.runtime.onnx_quant import QdqReport, qdq_scales, quantize_onnx

# Percentile ranges clip, so they differ from the min-max ranges ONNX Runtime would calibrate itself.
PERCENTILE = QuantConfig(activation_range="percentile", percentile=99.0)


class Wrapped(nn.Module):
    """A model behind an attribute, as the diffusers UNet wrapper exports it: parameter names gain "unet."."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


class Tokens(nn.Module):
    """Linears on [batch, tokens, features]: exported as MatMuls by transposed weights under generated names."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Fork(nn.Module):
    """Two Linears reading one tensor, as attention's to_q, to_k and to_v do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class _Reader(CalibrationDataReader):
    """Calibration feeds as ONNX Runtime's calibrator reads them."""

    def __init__(self, items: list[dict[str, np.ndarray]]):
        self._items = iter(items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def simulate(model: nn.Module, batches: list[torch.Tensor], config: QuantConfig = PERCENTILE, **kwargs) -> nn.Module:
    sim = quantize_(copy.deepcopy(model), config, **kwargs)
    calibrate(sim, batches, lambda m, b: m(b))
    return sim


def feeds(batches: list[torch.Tensor], name: str) -> list[dict[str, np.ndarray]]:
    return [{name: b.numpy()} for b in batches]


def run(path, x: torch.Tensor, name: str) -> np.ndarray:
    return session(path, threads=1).run(None, {name: x.numpy()})[0]


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qdq")
    net = conv_net()
    torch.manual_seed(1)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    fp32 = export_onnx(Wrapped(net), (batches[0][:1],), tmp / "fp32.onnx", ["image"], ["out"])
    sim = simulate(net, batches)
    report = quantize_onnx(fp32, tmp / "int8.onnx", sim, feeds(batches, "image"), prefix="unet.")
    return net, sim, batches, fp32, tmp / "int8.onnx", report


def test_qdq_file_carries_the_simulated_scales(convs):
    _, sim, _, _, int8, report = convs
    layers = {name: m for name, m in sim.named_modules() if isinstance(m, QuantLayer)}
    assert report.layers == 3 and not report.unmatched and not report.conflicts and not report.excluded
    assert set(report.overridden) == set(report.weights_overridden) == set(layers)
    # The Linear reads the Flatten output, which ONNX Runtime quantizes with the Flatten input's parameters.
    assert report.inputs["0"] == "image" and report.inputs["5"].endswith("Flatten_output_0")
    scales = qdq_scales(int8)
    for name, layer in layers.items():
        scale, zero_point = scales[report.inputs[name]]
        assert scale == pytest.approx(float(layer.input_scale), rel=1e-6)
        assert zero_point == int(layer.input_zero_point)
    model = onnx.load(str(int8))
    per_channel = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_scale")
                   and numpy_helper.to_array(i).size > 1]
    for layer in layers.values():
        assert any(s.shape == layer.weight_scale.shape and np.allclose(s, layer.weight_scale.numpy(), rtol=1e-6)
                   for s in per_channel)
    assert QdqReport(**report.to_dict()) == report


def test_deployed_int8_runs_the_simulation(convs, tmp_path):
    _, sim, batches, fp32, int8, _ = convs
    # The same quantizer calibrating its own (min-max) ranges, as without the simulation's overrides.
    quant_pre_process(str(fp32), str(tmp_path / "prepared.onnx"), auto_merge=True)
    quantize_static(str(tmp_path / "prepared.onnx"), str(tmp_path / "own.onnx"), _Reader(feeds(batches, "image")),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    torch.manual_seed(2)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        simulated = sim(x).numpy()
    deployed = np.abs(run(int8, x, "image") - simulated).max()
    own = np.abs(run(tmp_path / "own.onnx", x, "image") - simulated).max()
    # Outputs reach 0.25. The file runs the simulation up to the odd value rounded the other way where its
    # integer kernel requantizes a conv's output (measured: 3e-4), a hundred times closer than the file
    # ONNX Runtime calibrated itself (3e-2). Without the Linear's input scale on the Relu output before the
    # Flatten, that conv's output would be rounded twice, on two grids (measured: 1.5e-3).
    assert deployed < 1e-3
    assert deployed < own / 20


def test_linear_on_tokens_matches_its_matmul(tmp_path):
    torch.manual_seed(0)
    model = Tokens().eval()
    batches = [torch.randn(4, 6, 16) for _ in range(3)]
    fp32 = export_onnx(model, (batches[0][:1],), tmp_path / "fp32.onnx", ["tokens"], ["out"])
    assert not any(n.op_type == "Gemm" for n in onnx.load(str(fp32)).graph.node)
    sim = simulate(model, batches)
    report = quantize_onnx(fp32, tmp_path / "int8.onnx", sim, feeds(batches, "tokens"))
    assert report.overridden == report.weights_overridden == ["fc1", "fc2"]
    scales = qdq_scales(tmp_path / "int8.onnx")
    for name in ("fc1", "fc2"):
        layer = getattr(sim, name)
        assert scales[report.inputs[name]] == (pytest.approx(float(layer.input_scale), rel=1e-6),
                                               int(layer.input_zero_point))
    x = torch.randn(8, 6, 16)
    with torch.no_grad():
        simulated = sim(x).numpy()
    # Integer MatMuls with float outputs and the bias added in float, as simulated: equal up to float rounding.
    np.testing.assert_allclose(run(tmp_path / "int8.onnx", x, "tokens"), simulated, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [QuantConfig(group_size=4), QuantConfig(weight_bits=4)], ids=["group", "4bit"])
def test_schemes_qdq_cannot_hold_are_refused(convs, tmp_path, config):
    net, _, batches, fp32, _, _ = convs
    sim = simulate(net, batches, config)
    with pytest.raises(ValueError, match="cannot be deployed as U8S8 QDQ"):
        quantize_onnx(fp32, tmp_path / "int8.onnx", sim, feeds(batches, "image"), prefix="unet.")


def test_half_layers_stay_float(convs, tmp_path):
    net, _, batches, fp32, _, _ = convs
    sim = simulate(net, batches, fallback={"2": None})
    report = quantize_onnx(fp32, tmp_path / "int8.onnx", sim, feeds(batches, "image"), prefix="unet.")
    assert report.layers == 2 and len(report.excluded) == 1
    assert set(report.overridden) == {"0", "5"}
    conv = next(n for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if n.name == report.excluded[0])
    assert conv.input[1] == "unet.2.weight"  # the float initializer, not a dequantized int8 one
    assert report.float_ops.get("Conv") == 1



def test_a_tensor_read_with_two_scales_keeps_the_first(tmp_path):
    torch.manual_seed(0)
    model = Fork().eval()
    batches = [torch.randn(8, 16) for _ in range(3)]
    fp32 = export_onnx(model, (batches[0][:1],), tmp_path / "fp32.onnx", ["x"], ["out"])
    sim = simulate(model, batches, fallback={"b": QuantConfig(activation_range="percentile", percentile=90.0)})
    assert float(sim.a.input_scale) != float(sim.b.input_scale)
    report = quantize_onnx(fp32, tmp_path / "int8.onnx", sim, feeds(batches, "x"))
    assert len(report.conflicts) == 1 and report.conflicts[0].startswith("x: a ")
    assert report.overridden == ["a"] and report.weights_overridden == ["a", "b"]
    assert qdq_scales(tmp_path / "int8.onnx")["x"][0] == pytest.approx(float(sim.a.input_scale), rel=1e-6)
