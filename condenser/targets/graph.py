"""The ONNX graph as the virtual targets see it: nodes in execution order with their shapes, MACs, op counts and
bytes, the peak activation memory of running them in that order, and the operators a target cannot run.

`load_graph` fixes the symbolic batch dimension, runs ONNX shape inference (with data propagation, so a
Reshape to a computed shape resolves) and folds what is constant once the batch is fixed: Constant nodes,
Shape/Size, and every node whose inputs are all constants or shapes (a weight's DequantizeLinear, the
exporter's shape arithmetic, an embedding lookup of a fixed concept). Those run once at load time, or not at
all after a runtime's constant folding, so they are neither nodes nor activations here. Operators that
multiply-accumulate are never folded, even on constants alone (a FiLM layer's Gemm on the fixed concept's
code): they are the model's arithmetic, and `condenser.compress.contract.macs` counts them.

QDQ files (ONNX Runtime's static quantization: QuantizeLinear/DequantizeLinear around float operators) are
read as an int8 runtime executes them: an operator whose inputs all come from DequantizeLinear and whose
outputs all go to QuantizeLinear (through at most one Relu/Clip, which the kernel fuses) is `quantized`, and
its bytes are counted at the int8 tensors it reads and writes; `qdq_fusion` names the QuantizeLinear,
DequantizeLinear and Relu/Clip nodes such a kernel absorbs.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper, shape_inference
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from condenser.core.errors import DataError

# Operators that multiply-accumulate, with the positions of their two multiplied inputs.
_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1)}
MAC_OPS = frozenset({*_CONV, *_MATMUL, "ConvTranspose", "Einsum"})
# Operators that only move, copy or reinterpret data: no arithmetic, their cost is the bytes they touch.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements", "GatherND",
                           "Shape", "Size", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "Cast",
                           "Split", "Expand", "Tile", "Pad", "ConstantOfShape", "DepthToSpace", "SpaceToDepth",
                           "ScatterND", "ScatterElements"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
# Operators whose arithmetic runs over their whole input to produce a smaller output: counted per input element.
_REDUCING = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "QLinearGlobalAveragePool",
                       "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                       "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Activations an int8 kernel applies on its output before requantizing (CMSIS-NN, XNNPACK, ORT all fuse them).
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Folded constants seen through on the way to the initializer a node reads: its stored size is what it costs.
_WEIGHT_CHAIN = frozenset({"DequantizeLinear", "Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze"})


@dataclass(frozen=True)
class Node:
    """One operator as it runs at the loaded batch size. `inputs` are activation tensors only (constants and
    shapes are folded); `macs` counts multiply-accumulates (Conv-like: output elements x input channels per
    group x kernel area; MatMul-like: M x N x K with batch dimensions); `ops` the arithmetic operations (2 per
    MAC, one per output element for element-wise, normalization and the like, output elements x window for
    pooling, input elements for reductions, 0 for data movement); bytes are of the activations read and
    written (at int8 size for a `quantized` node of a QDQ file) and of the constants read (`weight_bytes`,
    at their stored size: 1 byte per QDQ int8 weight; int64 shape and index tensors are not weights)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    macs: int
    ops: int
    input_bytes: int
    output_bytes: int
    weight_bytes: int
    out_shape: tuple[int, ...]
    quantized: bool


@dataclass(frozen=True)
class Graph:
    """A model's nodes in execution order (ONNX's topological order, constants folded, see the module's
    docstring), the size of every activation tensor, and the bytes of its constants (what goes in flash)."""

    nodes: tuple[Node, ...]
    tensor_bytes: dict[str, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int

    def consumers(self) -> dict[str, list[int]]:
        """Every activation tensor's reading nodes, by index in execution order."""
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in dict.fromkeys(node.inputs):
                readers.setdefault(t, []).append(i)
        return readers

    def edges(self) -> list[tuple[int, int]]:
        """(producer index, consumer index) for every activation tensor passed between two nodes, each pair once."""
        producer = {t: i for i, n in enumerate(self.nodes) for t in n.outputs}
        pairs = {}
        for j, node in enumerate(self.nodes):
            for t in node.inputs:
                i = producer.get(t)
                if i is not None:
                    pairs[(i, j)] = None
        return list(pairs)

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def ops(self) -> int:
        return sum(n.ops for n in self.nodes)

    def operators(self) -> Counter[str]:
        """How many nodes of each operator type."""
        return Counter(n.op for n in self.nodes)


@dataclass(frozen=True)
class Liveness:
    """The peak of activation memory over a run: its bytes, the node running then and the tensors alive."""

    peak_bytes: int
    at_node: str
    live: tuple[str, ...]


@dataclass(frozen=True)
class QdqFusion:
    """How an int8 runtime runs a QDQ graph: `absorbed` nodes (QuantizeLinear, DequantizeLinear and Relu/Clip
    inside a quantized kernel) do not run on their own; `free` float tensors live only inside a kernel;
    `alias` maps a dequantized tensor to the int8 tensor the kernel reads instead; `writes` adds to a kernel
    the int8 outputs of the QuantizeLinear nodes it absorbed."""

    absorbed: frozenset[int]
    free: frozenset[str]
    alias: dict[str, str]
    writes: dict[int, tuple[str, ...]]


def _describe(source: Path | onnx.ModelProto) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the ONNX model given"


def _fix_batch(model: onnx.ModelProto, batch: int, where: str) -> None:
    """Give every symbolic dimension of the graph's inputs and outputs the value `batch` where it is a batch
    dimension (axis 0, or a name used on axis 0); any other symbolic dimension is a DataError."""
    graph = model.graph
    batch_names = {v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]
                   if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim) > 0}
    for is_input, value in [*((True, v) for v in graph.input), *((False, v) for v in graph.output)]:
        if not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if axis == 0 or (dim.dim_param and dim.dim_param in batch_names):
                dim.Clear()
                dim.dim_value = batch
            elif is_input:
                raise DataError(f"{where}: input '{value.name}' has a symbolic dimension "
                                f"'{dim.dim_param or '?'}' on axis {axis}; export it with fixed image sizes "
                                "(only the batch dimension may vary)")
            else:
                dim.Clear()  # an output's other dims come from inference


def _known_shapes(model: onnx.ModelProto, where: str) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """(element type, shape) of every tensor of `model` that inference can type. ONNX's own inference first;
    where it leaves a node's output unknown (the exporter's shape arithmetic, Shape -> Gather -> Div -> Slice,
    is beyond its data propagation), ONNX Runtime's symbolic inference fills the gaps: it evaluates that
    arithmetic, but gets some shapes wrong that ONNX's gets right (Einsum with an ellipsis)."""
    failure: Exception | None = None
    try:
        known = _shapes(shape_inference.infer_shapes(model, strict_mode=False, data_prop=True))
    except Exception as error:  # onnx raises several types, all meaning the same here
        known, failure = _shapes(model), error
    produced = {o for n in model.graph.node for o in n.output if o}
    if any(known.get(t, (0, None))[1] is None for t in produced):
        try:
            filled = _shapes(SymbolicShapeInference.infer_shapes(model, auto_merge=True))
        except Exception:  # it raises bare Exceptions; ONNX's error, or the unknown shape, is the message
            if failure is not None:
                raise DataError(f"{where}: ONNX shape inference failed ({type(failure).__name__}: {failure}); "
                                "re-export the model with a supported opset") from failure
            filled = {}
        for name, typed in filled.items():
            if known.get(name, (0, None))[1] is None:
                known[name] = typed
    return known


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """(element type, shape or None where unknown) of every tensor shape inference typed."""
    known: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    graph = model.graph
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        shape = None
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shape = tuple(int(d.dim_value) for d in tensor.shape.dim)
        known[value.name] = (tensor.elem_type, shape)
    for init in graph.initializer:
        known[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return known


def _itemsize(elem_type: int) -> int:
    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _einsum_macs(node: onnx.NodeProto, shapes: list[tuple[int, ...]], out_elems: int) -> int:
    """Output elements x the sizes of the contracted indices: the multiply-accumulates of the einsum's loop."""
    equation = _attr(node, "equation", b"").decode().replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), shapes):
        head, ellipsis, tail = term.partition("...")
        # Letters before an ellipsis index the leading dimensions, those after it the trailing ones.
        sizes.update(zip(head, shape[:len(head)]))
        if ellipsis and tail:
            sizes.update(zip(tail, shape[-len(tail):]))
    if not arrow:  # implicit output: the letters used once (their order does not change the count)
        counts = Counter(c for c in lhs if c.isalpha())
        rhs = "".join(c for c, n in counts.items() if n == 1)
    return out_elems * math.prod(sizes[c] for c in set(sizes) - set(rhs))


def _macs(node: onnx.NodeProto, shape_of, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of `node` given the shapes of its inputs (`shape_of(name)`) and first output."""
    op, out_elems = node.op_type, math.prod(out_shape)
    if op in _CONV:
        weight = shape_of(node.input[_CONV[op][1]])
        return out_elems * math.prod(weight[1:])  # weight: [Cout, Cin/groups, *kernel]
    if op == "ConvTranspose":
        # Each input element is scattered to Cout/groups x kernel-area outputs: weight [Cin, Cout/groups, *k].
        weight = shape_of(node.input[1])
        return math.prod(shape_of(node.input[0])) * math.prod(weight[1:])
    if op in _MATMUL:
        a = shape_of(node.input[_MATMUL[op][0]])
        if op == "Gemm":
            k = a[0] if _attr(node, "transA", 0) else a[-1]
        else:
            k = a[-1]
        return out_elems * k
    if op == "Einsum":
        return _einsum_macs(node, [shape_of(i) for i in node.input], out_elems)
    return 0


def _ops(node: onnx.NodeProto, macs: int, shape_of, out_shape: tuple[int, ...]) -> int:
    op, out_elems = node.op_type, math.prod(out_shape)
    if op in MAC_OPS:
        return 2 * macs
    if op in DATA_MOVEMENT:
        return 0
    if op in _POOLS:
        return out_elems * math.prod(_attr(node, "kernel_shape", []))
    if op in _REDUCING:
        return math.prod(shape_of(node.input[0]))
    return out_elems


def load_graph(source: Path | onnx.ModelProto, batch: int = 1) -> Graph:
    """The graph of the ONNX file (or model) `source` at batch size `batch`: shape-inferred, constants folded,
    every node measured (see `Node`). Works on float exports and on QDQ int8 files. Raises DataError naming
    the file when it is missing or a tensor's shape cannot be inferred."""
    where = _describe(source)
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
    else:
        if not Path(source).is_file():
            raise DataError(f"{where}: missing; export the model to ONNX first")
        model = onnx.load(str(source))
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    _fix_batch(model, batch, where)
    model.graph.ClearField("value_info")
    known = _known_shapes(model, where)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(v.name for v in graph.input if v.name not in initializers)
    outputs = tuple(v.name for v in graph.output)

    def shape_of(name: str) -> tuple[int, ...]:
        found = known.get(name, (0, None))[1]
        if found is None:
            raise DataError(f"{where}: the shape of tensor '{name}' cannot be inferred; export the model with "
                            "static shapes (only the batch dimension symbolic)")
        return found

    def nbytes(name: str) -> int:
        return _itemsize(known.get(name, (0, None))[0]) * math.prod(shape_of(name))

    # Constants once the batch is fixed: initializers, Constant outputs, shapes, and what is computed from them.
    static: set[str] = set(initializers) | {""}
    folded_by: dict[str, onnx.NodeProto] = {}
    constant_bytes = sum(nbytes(i.name) for i in graph.initializer)
    kept: list[tuple[int, onnx.NodeProto]] = []
    for index, node in enumerate(graph.node):
        foldable = node.op_type in ("Constant", "Shape", "Size") or (
            node.op_type not in MAC_OPS and len(node.input) > 0 and all(i in static for i in node.input))
        if foldable:
            static.update(node.output)
            folded_by.update({o: node for o in node.output})
            if node.op_type == "Constant":
                constant_bytes += sum(nbytes(o) for o in node.output if o in known)
        else:
            kept.append((index, node))

    def weight_bytes(name: str) -> int:
        """Stored bytes of the constant `name` as a node reads it, seen through weight-format chains."""
        producer = folded_by.get(name)
        while producer is not None and producer.op_type in _WEIGHT_CHAIN:
            name = producer.input[0]
            producer = folded_by.get(name)
        if known.get(name, (0, None))[0] == onnx.TensorProto.INT64:
            return 0
        return nbytes(name)

    producers = {o: n for _, n in kept for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for _, node in kept:
        for t in dict.fromkeys(i for i in node.input if i not in static):
            readers.setdefault(t, []).append(node)
    quantized = _quantized_nodes([n for _, n in kept], producers, readers, set(outputs))

    def int8_view(node: onnx.NodeProto, tensor: str, reading: bool) -> str:
        """The int8 tensor a quantized QDQ kernel reads or writes in place of the float `tensor`."""
        if reading:
            dq = producers.get(tensor)
            return dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else tensor
        step = readers.get(tensor, [])
        if len(step) == 1 and step[0].op_type in _FUSED_ACTIVATIONS:
            step = readers.get(step[0].output[0], [])
        return step[0].output[0] if step and step[0].op_type == "QuantizeLinear" else tensor

    nodes, tensor_bytes = [], {t: nbytes(t) for t in inputs}
    for index, node in kept:
        acts_in = tuple(dict.fromkeys(i for i in node.input if i not in static))
        acts_out = tuple(o for o in node.output if o)
        out_shape = shape_of(acts_out[0]) if acts_out else ()
        tensor_bytes.update({o: nbytes(o) for o in acts_out})
        is_q = id(node) in quantized
        int8 = is_q and node.op_type not in _QDQ and not node.op_type.startswith("QLinear")
        macs = _macs(node, shape_of, out_shape)
        nodes.append(Node(
            name=node.name or f"{node.op_type}_{index}", op=node.op_type, inputs=acts_in, outputs=acts_out,
            macs=macs, ops=_ops(node, macs, shape_of, out_shape),
            input_bytes=sum(nbytes(int8_view(node, t, True) if int8 else t) for t in acts_in),
            output_bytes=sum(nbytes(int8_view(node, t, False) if int8 else t) for t in acts_out),
            weight_bytes=sum(weight_bytes(i) for i in dict.fromkeys(node.input) if i and i in static),
            out_shape=out_shape, quantized=is_q))
    return Graph(nodes=tuple(nodes), tensor_bytes=tensor_bytes, inputs=inputs, outputs=outputs,
                 weight_bytes=constant_bytes)


def _quantized_nodes(nodes: list[onnx.NodeProto], producers: dict[str, onnx.NodeProto],
                     readers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> set[int]:
    """ids of the nodes running in int8: QLinear*/*Integer operators, and in QDQ format the operators reading
    only dequantized tensors and writing only tensors that are quantized again (through at most one fused
    Relu/Clip, itself then int8), and MAC operators reading only dequantized tensors."""

    def dequantized(t: str) -> bool:
        producer = producers.get(t)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def requantized(t: str, through_activation: bool) -> bool:
        users = readers.get(t, [])
        if t in outputs or not users:
            return False
        return all(u.op_type == "QuantizeLinear" or (
            through_activation and u.op_type in _FUSED_ACTIVATIONS
            and all(requantized(o, False) for o in u.output)) for u in users)

    found = set()
    for node in nodes:
        op = node.op_type
        if op.startswith("QLinear") or "Integer" in op or op == "QGemm":
            found.add(id(node))
            continue
        acts = [i for i in node.input if i in producers or i in readers]
        if op in _QDQ or not acts:
            continue
        if not all(dequantized(t) for t in acts):
            continue
        requant = all(requantized(o, True) for o in node.output if o)
        # A MAC operator reading int8 does its multiply-accumulates in integers even when its result goes
        # on in float (ONNX Runtime's integer MatMul/Gemm return float; quantize leaves them so on purpose).
        if requant or op in MAC_OPS:
            found.add(id(node))
        if requant:
            for o in node.output:
                found.update(id(u) for u in readers.get(o, []) if u.op_type in _FUSED_ACTIVATIONS)
    return found


def qdq_fusion(graph: Graph) -> QdqFusion:
    """Which nodes and float tensors of a QDQ graph an int8 runtime folds into its quantized kernels (see
    `QdqFusion`); empty for a float graph or a QOperator (QLinear*) one."""
    readers = graph.consumers()
    nodes = graph.nodes
    outputs = set(graph.outputs)
    absorbed: set[int] = set()
    free: set[str] = set()
    alias: dict[str, str] = {}
    writes: dict[int, tuple[str, ...]] = {}

    def kernel(i: int) -> bool:
        return nodes[i].quantized and nodes[i].op not in _QDQ

    for i, node in enumerate(nodes):
        if i in absorbed:  # a Relu/Clip fused into the kernel before it
            continue
        if node.op == "DequantizeLinear" and node.inputs:
            out = node.outputs[0]
            users = readers.get(out, [])
            if users and out not in outputs and all(kernel(u) for u in users):
                absorbed.add(i)
                free.add(out)
                alias[out] = node.inputs[0]
        elif kernel(i) and not node.op.startswith("QLinear") and "Integer" not in node.op and node.op != "QGemm":
            extra: list[str] = []
            pending = list(node.outputs)
            while pending:
                t = pending.pop()
                users = readers.get(t, [])
                if t in outputs or not users:
                    continue
                if all(nodes[u].op == "QuantizeLinear" or (nodes[u].op in _FUSED_ACTIVATIONS and nodes[u].quantized)
                       for u in users):
                    free.add(t)
                    for u in users:
                        absorbed.add(u)
                        if nodes[u].op == "QuantizeLinear":
                            extra.extend(nodes[u].outputs)
                        else:
                            pending.extend(nodes[u].outputs)
            writes[i] = tuple(extra)
    return QdqFusion(absorbed=frozenset(absorbed), free=frozenset(free), alias=alias, writes=writes)


def peak_memory(graph: Graph, fuse_qdq: bool = True) -> Liveness:
    """The peak activation memory of running `graph`'s nodes in order: a tensor is allocated when written
    (graph inputs at the start) and freed after its last reader (graph outputs never are); while a node runs,
    its inputs, its outputs and every tensor still needed later are alive. Constants live in flash and are
    not counted. With `fuse_qdq`, a QDQ graph is counted as an int8 runtime runs it (`qdq_fusion`): the float
    tensors inside a quantized kernel take no memory and the kernel reads and writes the int8 tensors."""
    fusion = qdq_fusion(graph) if fuse_qdq else QdqFusion(frozenset(), frozenset(), {}, {})
    steps: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    for i, node in enumerate(graph.nodes):
        if i in fusion.absorbed:
            continue
        reads = tuple(dict.fromkeys(fusion.alias.get(t, t) for t in node.inputs))
        written = tuple(t for t in (*node.outputs, *fusion.writes.get(i, ())) if t not in fusion.free)
        steps.append((node.name, reads, written))
    if not steps:
        raise ValueError("the graph has no nodes to run")
    last_use: dict[str, int] = {}
    for k, (_, reads, written) in enumerate(steps):
        for t in written:
            last_use.setdefault(t, k)
        for t in reads:
            last_use[t] = k
    kept = set(graph.outputs)
    alive = {t: graph.tensor_bytes.get(t, 0) for t in graph.inputs}
    current = sum(alive.values())
    best = Liveness(-1, "", ())
    for k, (name, reads, written) in enumerate(steps):
        for t in written:
            if t not in alive:
                alive[t] = graph.tensor_bytes.get(t, 0)
                current += alive[t]
        if current > best.peak_bytes:
            best = Liveness(current, name, tuple(alive))
        for t in [t for t in alive if last_use.get(t, -1) <= k and t not in kept]:
            current -= alive.pop(t)
    return best


def disallowed(graph: Graph, allowed: Iterable[str], int8_only: bool = False) -> list[dict]:
    """The nodes a target cannot run, in graph order: those whose operator is not in `allowed`
    (QuantizeLinear/DequantizeLinear always are), and with `int8_only` the compute nodes (not data movement)
    that run in float. Each: {"node", "op", "reason"}."""
    allowed = set(allowed) | _QDQ
    found = []
    for node in graph.nodes:
        if node.op not in allowed:
            found.append({"node": node.name, "op": node.op, "reason": "not in the allowed operators"})
        # A node reading no activation (the editor's FiLM Gemm on its fixed concept code) computes a
        # constant: a microcontroller build folds it, so it runs in no precision at all.
        elif int8_only and not node.quantized and node.inputs and node.op not in DATA_MOVEMENT | _QDQ:
            found.append({"node": node.name, "op": node.op, "reason": "runs in float"})
    return found
