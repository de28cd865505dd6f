"""ONNX graph analysis and the analytic estimators: MACs, op counts and the liveness peak on hand-built graphs
whose numbers are worked out by hand (float and QDQ int8), the operators a target cannot run, the op-count fit
and the roofline, and a real exported editor cross-checked against PyTorch's MAC count and ExecuTorch's memory
planner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from condenser.compress.contract import macs as torch_macs
from condenser.core.errors import DataError
from condenser.models.editor import Generator, GeneratorConfig
from condenser.runtime.executorch import arena_bytes, export_pte
from condenser.runtime.onnx import export_onnx
from condenser.targets.estimate import Roofline, fit_opcount, opcount_latency, roofline_latency
from condenser.targets.graph import disallowed, load_graph, peak_memory, qdq_fusion

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hand", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(cin: int, cout: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cin)
    return rng.normal(size=(cout, cin, 3, 3)).astype(np.float32), np.zeros(cout, np.float32)


def _residual(cin: int = 4, batch: str | int = "batch") -> onnx.ModelProto:
    """x [N,cin,8,8] -> Conv(8, 3x3, pad 1) -> Relu -> Conv(8, 3x3, pad 1) -> Add(skip from the Relu) -> y."""
    (w1, b1), (w2, b2) = _weights(cin), _weights(8)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], "conv2", **conv),
             helper.make_node("Add", ["c2", "r"], ["y"], "add")]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [batch, cin, 8, 8])],
                  [helper.make_tensor_value_info("y", F32, [batch, 8, 8, 8])],
                  [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])


def _residual_qdq() -> onnx.ModelProto:
    """The residual graph as ONNX Runtime's QDQ quantizer writes it: uint8 activations (x, the Relu's output,
    conv2's output, y) each quantized once and dequantized before their readers (the Relu's by one
    DequantizeLinear shared by conv2 and the Add), int8 weights and int32 biases dequantized from initializers,
    float input and output."""
    (w1, _), (w2, _) = _weights(4), _weights(8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp"),
             numpy_helper.from_array(np.array(0.0005, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(8, np.int32), "b1q"),
             numpy_helper.from_array(np.zeros(8, np.int32), "b2q"),
             numpy_helper.from_array(np.clip(w1 * 30, -127, 127).astype(np.int8), "w1q"),
             numpy_helper.from_array(np.clip(w2 * 30, -127, 127).astype(np.int8), "w2q")]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}

    def q(a: str, b: str) -> onnx.NodeProto:
        return helper.make_node("QuantizeLinear", [a, "s", "zp"], [b], f"q_{a}")

    def dq(a: str, b: str, scale: str = "s", zero_point: str = "zp") -> onnx.NodeProto:
        return helper.make_node("DequantizeLinear", [a, scale, zero_point], [b], f"dq_{a}")

    nodes = [dq("w1q", "w1", "ws", "wzp"), dq("w2q", "w2", "ws", "wzp"),
             helper.make_node("DequantizeLinear", ["b1q", "bs"], ["b1"], "dq_b1q"),
             helper.make_node("DequantizeLinear", ["b2q", "bs"], ["b2"], "dq_b2q"),
             q("x", "xq"), dq("xq", "xd"),
             helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], "conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r"], "relu"),
             q("r", "rq"), dq("rq", "rd"),
             helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"], "conv2", **conv),
             q("c2", "c2q"), dq("c2q", "c2d"),
             helper.make_node("Add", ["c2d", "rd"], ["y"], "add"),
             q("y", "yq"), dq("yq", "out")]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, ["batch", 4, 8, 8])],
                  [helper.make_tensor_value_info("out", F32, ["batch", 8, 8, 8])], inits)


# MACs: conv1 writes 8x8x8 = 512 elements, each 4 in-channels x 9 taps = 36 MACs -> 18432;
# conv2 512 x (8 x 9 = 72) = 36864; total 55296.
HAND_MACS = 18432 + 36864


def test_float_graph_macs_and_liveness_by_hand():
    graph = load_graph(_residual())
    assert [n.name for n in graph.nodes] == ["conv1", "relu", "conv2", "add"]
    assert graph.macs == HAND_MACS and graph.ops == 2 * HAND_MACS + 512 + 512  # Relu and Add: one op per element
    assert sorted(graph.edges()) == [(0, 1), (1, 2), (1, 3), (2, 3)]
    conv1 = graph.nodes[0]
    assert conv1.out_shape == (1, 8, 8, 8) and not conv1.quantized
    assert conv1.weight_bytes == (8 * 4 * 9 + 8) * 4 and conv1.input_bytes == 1024 and conv1.output_bytes == 2048
    assert graph.weight_bytes == (8 * 4 * 9 + 8 + 8 * 8 * 9 + 8) * 4
    # Bytes: x 4x8x8x4 = 1024; c1, r, c2, y 8x8x8x4 = 2048 each. Alive while each node runs:
    # conv1 x + c1 = 3072 (x freed after); relu c1 + r = 4096; conv2 r + c2 = 4096 (r kept for the skip);
    # add c2 + r + y = 6144 -> the peak, at the Add.
    peak = peak_memory(graph)
    assert (peak.peak_bytes, peak.at_node, set(peak.live)) == (6144, "add", {"c2", "r", "y"})
    # The batch scales every activation (here linearly) and not the weights.
    assert peak_memory(load_graph(_residual(), batch=3)).peak_bytes == 3 * 6144


def test_qdq_graph_counts_int8_and_fuses_float_intermediates():
    graph = load_graph(_residual_qdq())
    by_name = {n.name: n for n in graph.nodes}
    assert not any(name.startswith("dq_w") or name.startswith("dq_b") for name in by_name)  # weight DQs folded
    assert graph.macs == HAND_MACS
    assert all(by_name[n].quantized for n in ("conv1", "relu", "conv2", "add"))
    assert not by_name["q_x"].quantized and not by_name["dq_yq"].quantized
    # An int8 kernel reads and writes uint8 tensors; its int8 weights count one byte each, int32 biases four.
    assert by_name["conv1"].input_bytes == 256 and by_name["conv1"].output_bytes == 512
    assert by_name["conv1"].weight_bytes == 8 * 4 * 9 + 8 * 4
    assert graph.tensor_bytes["xq"] == 256 and graph.tensor_bytes["rq"] == 512 and graph.tensor_bytes["out"] == 2048
    fusion = qdq_fusion(graph)
    assert {graph.nodes[i].name for i in fusion.absorbed} == {"dq_xq", "relu", "q_r", "dq_rq", "q_c2", "dq_c2q",
                                                             "q_y"}
    assert fusion.free == {"xd", "c1", "r", "rd", "c2", "c2d", "y"}
    # Fused, the runtime runs q_x, conv1, conv2, add, dq_yq. x 1024 B float, xq 256, rq, c2q, yq 512 each,
    # out 2048 float. q_x: x + xq = 1280; conv1: xq + rq = 768; conv2: rq + c2q = 1024; add: rq + c2q + yq =
    # 1536; dq_yq: yq + out = 2560 -> the peak, 6144 - 2560 = 3584 bytes under the float graph's.
    peak = peak_memory(graph)
    assert (peak.peak_bytes, peak.at_node, set(peak.live)) == (2560, "dq_yq", {"yq", "out"})
    assert peak_memory(load_graph(_residual())).peak_bytes - peak.peak_bytes == 3584
    # Unfused, every float tensor is real: the Add holds rd, c2d and y in float, as the float graph does.
    unfused = peak_memory(graph, fuse_qdq=False)
    assert (unfused.peak_bytes, unfused.at_node) == (6144, "add")


def test_disallowed_names_the_nodes():
    x = helper.make_tensor_value_info("x", F32, [1, 4, 8, 8])
    nodes = [helper.make_node("InstanceNormalization", ["x", "g", "b"], ["n"], "norm"),
             helper.make_node("Resize", ["n", "", "scales"], ["up"], "upsample", mode="nearest"),
             helper.make_node("Relu", ["up"], ["y"], "act")]
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "g"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    graph = load_graph(_model(nodes, [x], [helper.make_tensor_value_info("y", F32, None)], inits))
    assert graph.nodes[1].out_shape == (1, 4, 16, 16) and graph.nodes[1].ops == 4 * 16 * 16
    assert disallowed(graph, ["Relu", "Conv"]) == [
        {"node": "norm", "op": "InstanceNormalization", "reason": "not in the allowed operators"},
        {"node": "upsample", "op": "Resize", "reason": "not in the allowed operators"}]
    # int8 only: every float compute node is named; the QDQ graph's are all int8 (Q/DQ always allowed).
    assert [d["node"] for d in disallowed(load_graph(_residual()), ["Conv", "Relu", "Add"], int8_only=True)] == [
        "conv1", "relu", "conv2", "add"]
    assert disallowed(load_graph(_residual_qdq()), ["Conv", "Relu", "Add"], int8_only=True) == []


def test_matmul_einsum_and_shape_errors(tmp_path):
    a, b = helper.make_tensor_value_info("a", F32, [2, 3, 4]), helper.make_tensor_value_info("b", F32, [2, 4, 5])
    nodes = [helper.make_node("MatMul", ["a", "b"], ["m"], "mm"),
             helper.make_node("Einsum", ["a", "b"], ["e"], "es", equation="bij,bjk->bik"),
             helper.make_node("Softmax", ["m"], ["s"], "sm", axis=-1),
             helper.make_node("Add", ["s", "e"], ["y"], "sum")]
    graph = load_graph(_model(nodes, [a, b], [helper.make_tensor_value_info("y", F32, None)], []))
    # Both multiply 2 batches of [3,4] x [4,5]: 2 x 3 x 5 outputs x 4 = 120 MACs; Softmax one op per element.
    assert [n.macs for n in graph.nodes] == [120, 120, 0, 0] and graph.nodes[2].ops == 30
    bad = _residual()
    bad.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    path = tmp_path / "dynamic.onnx"
    onnx.save(bad, str(path))
    with pytest.raises(DataError, match="dynamic.onnx.*height"):
        load_graph(path)
    with pytest.raises(DataError, match="missing.onnx"):
        load_graph(tmp_path / "missing.onnx")


def test_opcount_fit_recovers_known_coefficients():
    graphs = [load_graph(_residual(cin)) for cin in (1, 4, 16, 32)]
    assert len({g.ops for g in graphs}) == 4
    latencies = [opcount_latency(g, ms_per_mop=2.5, overhead_ms=0.4) for g in graphs]
    assert latencies[0] == pytest.approx(0.4 + 2.5 * graphs[0].ops / 1e6)
    slope, intercept = fit_opcount(graphs, latencies)
    assert slope == pytest.approx(2.5, rel=1e-9) and intercept == pytest.approx(0.4, rel=1e-9)
    with pytest.raises(ValueError, match="two different op counts"):
        fit_opcount(graphs[:1] * 2, latencies[:1] * 2)


def test_roofline_bounds_by_hand():
    device = Roofline(int8_ops_per_s=4e9, float_ops_per_s=1e9, bytes_per_s=1e9, op_overhead_us=10)
    total, rows = roofline_latency(load_graph(_residual()), device)
    # conv1: 36864 ops / 1e9 = 36.864 us against (1024 + 2048 + 1184) B / 1e9 = 4.256 us -> compute, + 10 us.
    # relu: 512 ops = 0.512 us against 4096 B = 4.096 us -> memory. conv2: 73728 ops = 73.728 us against
    # (2048 + 2048 + 2336) B = 6.432 us -> compute. add: 512 ops against 6144 B = 6.144 us -> memory.
    assert [r["bound"] for r in rows] == ["compute", "memory", "compute", "memory"]
    expected = [46.864, 14.096, 83.728, 16.144]
    assert [r["ms"] for r in rows] == pytest.approx([us / 1e3 for us in expected])
    assert total == pytest.approx(sum(expected) / 1e3)
    # int8: the Q/DQ/Relu nodes cost nothing of their own (absorbed by the kernels, or converted at the
    # boundary of the operator the NPU schedules); conv1 at the int8 peak: 36864 / 4e9 = 9.216 us + 10 us.
    total8, rows8 = roofline_latency(load_graph(_residual_qdq()), device)
    assert [r["node"] for r in rows8] == ["conv1", "conv2", "add"]
    assert rows8[0]["ms"] == pytest.approx(19.216e-3) and total8 < total
    with pytest.raises(ValueError, match="bytes_per_s=0"):
        Roofline(int8_ops_per_s=1, float_ops_per_s=1, bytes_per_s=0, op_overhead_us=0)


@pytest.fixture(scope="module")
def editor(tmp_path_factory) -> tuple[Generator, tuple[torch.Tensor], Path]:
    torch.manual_seed(0)
    model = Generator(GeneratorConfig(concepts=("a",), channels=8, blocks=1, block="resnet", code_dim=4, groups=4,
                                      default="a")).eval()
    example = (torch.rand(1, 3, 16, 16) * 2 - 1,)
    path = export_onnx(model, example, tmp_path_factory.mktemp("editor") / "editor.onnx", ["image"], ["edit"])
    return model, example, path


def test_real_editor_macs_and_memory_against_executorch(editor, tmp_path):
    model, example, path = editor
    graph = load_graph(path)
    # Same count as PyTorch's FlopCounterMode: convolutions and the FiLM Linear (kept though its input, the
    # fixed concept's code, is constant); nearest Resize, GroupNorm and the embedding lookup have no MACs.
    assert graph.macs == torch_macs(model, example)
    assert {"Conv", "InstanceNormalization", "Resize", "Concat", "Gemm"} <= set(graph.operators())
    peak = peak_memory(graph)
    # ExecuTorch plans an arena for what XNNPACK does not take (the GroupNorms and their neighbours); its
    # delegated intermediates live in XNNPACK's workspace, so the two differ but stay within a factor of 4
    # (measured: 52224 B at the decoder's second Concat against 35904 B, 1.45x).
    arena = arena_bytes(export_pte(model, example, tmp_path / "editor.pte"))
    assert 0.25 <= peak.peak_bytes / arena <= 4, (peak, arena)
    assert peak.at_node == "/Concat_2"


def test_real_editor_int8_qdq_loads_quantized(editor, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, example, path = editor

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"image": example[0].numpy()}])

        def get_next(self):
            return next(self.feeds, None)

    int8 = tmp_path / "editor.int8.onnx"
    quantize_static(str(path), str(int8), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    graph, fp32 = load_graph(int8), load_graph(path)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert len(convs) == 8 and all(n.quantized for n in convs)
    assert graph.macs == fp32.macs
    # int8 weights: a quarter of the float bytes, plus the int32 biases and the per-channel scales.
    float_conv_weights = sum(n.weight_bytes for n in fp32.nodes if n.op == "Conv")
    assert sum(n.weight_bytes for n in convs) < 0.3 * float_conv_weights
    assert graph.weight_bytes < 0.4 * fp32.weight_bytes
    # GroupNorm (InstanceNormalization) stays float and an int8-only target names every one.
    flagged = disallowed(graph, graph.operators(), int8_only=True)
    assert {d["op"] for d in flagged} >= {"InstanceNormalization"} and "Conv" not in {d["op"] for d in flagged}
    assert peak_memory(graph).peak_bytes <= peak_memory(fp32).peak_bytes
