"""Deploying a simulated int8 model to ONNX Runtime: a static QDQ (U8S8) file carrying the simulation's scales.

`quantize_` and `calibrate` fix, for every simulated layer, its input's scale and zero point and its weight's
per-channel scales; quality is measured on that simulation. ONNX Runtime's own static quantization would
calibrate ranges of its own (min-max over its calibration feeds), so the shipped model would compute
something else than what was measured. `quantize_onnx` therefore quantizes the float file with ONNX Runtime's
QDQ quantizer (uint8 activations, int8 per-channel weights: the fast pair on x86), handing it the
simulation's scales as tensor overrides and quantizing only what the simulation quantizes, then reads the
written file back to report which scales landed.

What the runtime still does beyond the simulation: its integer convolution requantizes its output to uint8
(with a range of its own calibration, or the next layer's simulated input range where a Relu leads there),
where the simulation keeps it in float. Integer MatMul and Gemm kernels return float, as simulated. The
operators between the simulated layers (normalizations, Softmax, element-wise arithmetic, attention's
activation products) run in float, as simulated (`float_ops`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from condenser.compress.quantize.layers import HalfLayer, QuantLayer, quantized_layers

# Operators whose output ONNX Runtime's QDQ quantizer quantizes with its input's scale and zero point,
# ignoring an override on the output, and whose output values are some of the input's (a reshuffle, a
# selection, a zero pad, a nearest-neighbour resize). Where one feeds a simulated layer, the layer's input
# scale goes on the tensors up that chain too and the chain is quantized: the producer above (a conv and its
# Relu) requantizes once, onto the simulated grid, not twice onto two. Averaging ones (AveragePool, linear
# Resize) stay float: their input's range is not their output's.
_SHARES_INPUT_PARAMS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "MaxPool",
                                  "Pad", "Resize", "Split", "Gather", "GatherElements"})
# Operators run on integers once ONNX Runtime has fused their QDQ groups, and the quantize/dequantize
# nodes themselves: every other operator of the optimized file that reads or writes float runs in float.
_INTEGER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                          "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                          "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                          "QLinearSoftmax", "QLinearWhere", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                          "QAttention", "QEmbedLayerNormalization", "QLinearReduceMean"})
_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Constant"})
# Operator types ONNX Runtime may quantize (of the nodes `_plan` picks): the simulated layers, the activations
# it folds into them, and the operators passing their quantized inputs through. Its default (every operator
# it can) would also requantize element-wise arithmetic, concatenations and normalizations, error the
# simulation never saw (measured on the editor: a third more deviation from the simulation, no faster).
_QUANTIZED_OPS = sorted({"Conv", "Gemm", "MatMul", "Relu", "Clip"} | _SHARES_INPUT_PARAMS)
# Relative tolerance of a scale read back from the file (stored as float32, as simulated).
_REL = 1e-6


@dataclass
class QdqReport:
    """What a QDQ file carries of the simulation. `overridden`, `weights_overridden`: the layers whose
    simulated input scale and zero point, or weight scales, the written file uses (read back from it);
    `inputs`: each matched layer's input tensor; `unmatched`: layers no graph node computes; `conflicts`:
    tensors read by layers with different simulated scales (the first layer's kept); `excluded`: nodes of
    float (HalfLayer) layers, left unquantized; `float_ops`: operators the runtime computes in float."""

    layers: int
    overridden: list[str] = field(default_factory=list)
    weights_overridden: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    float_ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Feeds(CalibrationDataReader):
    """The calibration feeds, once each, as ONNX Runtime's calibrator reads them."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        return None if feed is None else {k: np.ascontiguousarray(v) for k, v in feed.items()}


def _check_deployable(layers: dict[str, nn.Module]) -> None:
    """U8S8 QDQ holds one scheme: int8 symmetric weights per output channel, uint8 asymmetric inputs per
    tensor. Anything else would deploy as something other than what was simulated."""
    simulated = {name: m for name, m in layers.items() if isinstance(m, QuantLayer)}
    bad = [f"{name} ({m.extra_repr()}, symmetric={m.config.symmetric}, "
           f"activation_symmetric={m.config.activation_symmetric})"
           for name, m in simulated.items()
           if m.config.weight_bits != 8 or not m.config.symmetric or m.weight_scale.dim() != 1
           or m.config.activation_bits != 8 or m.config.activation_symmetric]
    if bad:
        raise ValueError("this scheme cannot be deployed as U8S8 QDQ, which holds only 8-bit symmetric per-channel "
                         f"weights with 8-bit unsigned asymmetric per-tensor inputs: {', '.join(bad)}")
    uncalibrated = [name for name, m in simulated.items() if not m.calibrated]
    if uncalibrated:
        raise ValueError(f"layers {uncalibrated} are not calibrated; run calibrate(model, batches, forward) first")


def _as_layer_weight(node: onnx.NodeProto, value: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The weight `node` multiplies by, laid out as the PyTorch layer's ([out, in, ...]), and the axis of its
    output channels in the node's own layout; None for a node that computes no Conv2d/Linear."""
    if node.op_type == "Conv":
        return value, 0
    if value.ndim != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return (value, 0) if trans_b else (value.T, 1)
    return (value.T, 1) if node.op_type == "MatMul" else None


def _match(graph: onnx.GraphProto, weights: dict[str, np.ndarray], layers: dict[str, nn.Module],
           prefix: str) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """The nodes computing each layer, with their weight's channel axis: by the weight's name (Conv, Gemm),
    else by value (a Linear on 3-D inputs exports as a MatMul by a transposed copy under a generated name)."""
    candidates = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in weights:
            laid = _as_layer_weight(node, weights[node.input[1]])
            if laid is not None:
                candidates.append((node, *laid))
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for name, layer in layers.items():
        weight = layer.inner.weight.detach().cpu().numpy()
        same = [(n, w, axis) for n, w, axis in candidates if w.shape == weight.shape]
        nodes = [(n, axis) for n, _, axis in same if n.input[1] == f"{prefix}{name}.weight"] or \
            [(n, axis) for n, w, axis in same if np.allclose(w, weight, rtol=0, atol=1e-7)]
        if nodes:
            found[name] = nodes
    return found


def _passes_through(node: onnx.NodeProto) -> bool:
    """Whether `node` outputs some of its first input's values, quantized as that input is."""
    if node.op_type == "Resize":
        return all(a.name != "mode" or a.s == b"nearest" for a in node.attribute)
    return node.op_type in _SHARES_INPUT_PARAMS


def _upstream(tensor: str, producers: dict[str, onnx.NodeProto]) -> list[str]:
    """`tensor` and the tensors above it that pass their values on to it (see `_SHARES_INPUT_PARAMS`)."""
    chain = [tensor]
    node = producers.get(tensor)
    while node is not None and _passes_through(node) and node.input[0] not in chain:
        chain.append(node.input[0])
        node = producers.get(node.input[0])
    return chain


class _QParams:
    """Scales and zero points of a model's QuantizeLinear/DequantizeLinear nodes (initializers, or Constant
    nodes), each converted when first asked for."""

    def __init__(self, model: onnx.ModelProto):
        self._protos = {i.name: i for i in model.graph.initializer}
        self._protos.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})

    def __call__(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        scale = numpy_helper.to_array(self._protos[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            return scale, numpy_helper.to_array(self._protos[node.input[2]])
        return scale, np.zeros((), np.uint8)


def qdq_scales(path: Path) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every tensor a QDQ file quantizes per tensor, by the float tensor's name."""
    model = onnx.load(str(path))
    qparams = _QParams(model)
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero_point = qparams(node)
            if scale.size == 1:
                scales[node.input[0]] = (float(scale.reshape(())), int(zero_point.reshape(())))
    return scales


def _float_ops(path: Path) -> dict[str, int]:
    """Operators of the file as ONNX Runtime runs it (its QDQ groups fused into integer kernels) that
    compute on float tensors: what stays float on device, by their op type in the file (a float Conv that
    the runtime fuses with its Relu counts as a Conv)."""
    in_file = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    with tempfile.TemporaryDirectory(prefix="condenser-ort-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    floats = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    floats |= {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    counts: Counter[str] = Counter()
    for node in graph.node:  # topologically sorted
        if node.op_type == "DequantizeLinear":
            floats.update(node.output)
        elif node.op_type not in _INTEGER_OPS | _SHAPE_OPS and any(i in floats for i in node.input):
            counts[in_file.get(node.name, node.op_type)] += 1
            floats.update(node.output)
    return dict(sorted(counts.items()))


class _Expected(NamedTuple):
    """What one node of a simulated layer must read in the written file."""

    node: str
    scale: np.ndarray
    zero_point: np.ndarray
    channel_scales: np.ndarray


def _plan(graph: onnx.GraphProto, layers: dict[str, nn.Module], prefix: str,
          report: QdqReport) -> tuple[dict[str, list[dict]], set[str], dict[str, list[_Expected]]]:
    """The tensor overrides carrying the simulation, the nodes to quantize (the simulated layers', those
    passing their inputs through, activations ONNX Runtime folds into them) and what each layer's nodes
    must read back. Fills the report's matching fields."""
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    matched = _match(graph, weights, layers, prefix)
    report.unmatched = sorted(set(layers) - set(matched))
    overrides: dict[str, list[dict]] = {}
    owner: dict[str, str] = {}
    to_quantize = {n.name for n in graph.node if n.op_type in ("Relu", "Clip")}
    expected: dict[str, list[_Expected]] = {}
    for name, nodes in matched.items():
        layer = layers[name]
        if isinstance(layer, HalfLayer):
            report.excluded += [n.name for n, _ in nodes]
            continue
        scale = np.array(float(layer.input_scale), np.float32)
        zero_point = np.array(round(float(layer.input_zero_point)), np.uint8)
        mine = {"scale": scale, "zero_point": zero_point}
        channel_scales = layer.weight_scale.detach().cpu().numpy().astype(np.float32)
        for node, axis in nodes:
            report.inputs[name] = node.input[0]
            to_quantize.add(node.name)
            chain = _upstream(node.input[0], producers)
            for tensor in chain:
                if tensor not in overrides:
                    overrides[tensor], owner[tensor] = [mine], name
                    continue
                kept = overrides[tensor][0]
                if kept["scale"] != scale or kept["zero_point"] != zero_point:
                    report.conflicts.append(
                        f"{tensor}: {owner[tensor]} (scale {float(kept['scale']):.6g}, zero point "
                        f"{int(kept['zero_point'])}) kept over {name} (scale {float(scale):.6g}, zero point "
                        f"{int(zero_point)})")
                    break
            to_quantize.update(producers[t].name for t in chain[:-1])
            # Symmetric int8 weights: zero point 0 in every channel; `axis` in the first channel's entry.
            overrides[node.input[1]] = [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
                                        for s in channel_scales]
            overrides[node.input[1]][0]["axis"] = axis
            expected.setdefault(name, []).append(_Expected(node.name, scale, zero_point, channel_scales))
    return overrides, to_quantize, expected


def quantize_onnx(fp32: Path, out: Path, simulated: nn.Module, calibration: Iterable[dict[str, np.ndarray]],
                  prefix: str = "") -> QdqReport:
    """Quantize the float file `fp32` (exported from `simulated`'s float model, its parameter names behind
    `prefix`) to a U8S8 QDQ file at `out` carrying `simulated`'s input and weight scales. ONNX Runtime
    calibrates on `calibration` (feeds by input name) only the convolution outputs its kernel requantizes;
    layers the simulation keeps float (HalfLayer), or that match no node, stay float. Raises ValueError for
    a scheme U8S8 QDQ cannot hold (group-wise, 4-bit, signed activations)."""
    layers = quantized_layers(simulated)
    _check_deployable(layers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = QdqReport(layers=sum(isinstance(m, QuantLayer) for m in layers.values()))
    with tempfile.TemporaryDirectory(prefix="condenser-qdq-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference fails on the exporter's dynamic batch unless it may merge symbolic dims.
        quant_pre_process(str(fp32), str(prepared), auto_merge=True)
        model = onnx.load(str(prepared))
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"  # nodes are quantized, excluded and verified by name
        overrides, to_quantize, expected = _plan(model.graph, layers, prefix, report)
        onnx.save(model, str(prepared))
        quantize_static(str(prepared), str(out), Feeds(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=_QUANTIZED_OPS,
                        nodes_to_quantize=sorted(to_quantize), nodes_to_exclude=report.excluded,
                        extra_options={"TensorQuantOverrides": overrides,
                                       # MatMul and Gemm have integer kernels with float outputs: the
                                       # simulation's float output, with its float bias.
                                       "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    # quant_pre_process's shape annotations are for the quantizer only: the runtime infers shapes itself,
    # and in a small model they are a tenth of the file that ships.
    shipped = onnx.load(str(out))
    shipped.graph.ClearField("value_info")
    onnx.save(shipped, str(out))
    _verify(out, expected, report)
    report.float_ops = _float_ops(out)
    return report


def _verify(path: Path, expected: dict[str, list[_Expected]], report: QdqReport) -> None:
    """Read back, for each layer's nodes in the written file, the scales their dequantized input and weight
    come with, and record the layers whose every node uses the simulation's."""
    model = onnx.load(str(path))
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    qparams = _QParams(model)

    def read(node: onnx.NodeProto | None, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        dq = producers.get(node.input[index]) if node is not None else None
        return qparams(dq) if dq is not None and dq.op_type == "DequantizeLinear" else None

    for name, uses in expected.items():
        inputs_ok = weights_ok = True
        for use in uses:
            node = nodes.get(use.node)
            got = read(node, 0)
            inputs_ok &= (got is not None and got[0].size == 1 and np.allclose(got[0], use.scale, rtol=_REL, atol=0)
                          and int(got[1]) == int(use.zero_point))
            got = read(node, 1)
            weights_ok &= (got is not None and got[0].shape == use.channel_scales.shape
                           and np.allclose(got[0], use.channel_scales, rtol=_REL, atol=0))
        if inputs_ok:
            report.overridden.append(name)
        if weights_ok:
            report.weights_overridden.append(name)
