"""Analytic latency estimates for the virtual targets, from the graph alone (`condenser.targets.graph`).

Two models, each with its coefficients in params:
- op count (MicroNets, Banbury et al. 2021): on a microcontroller, latency is close to linear in the model's
  operation count, so `overhead + ms_per_mop x Mops`; `fit_opcount` fits the two numbers on measured graphs
  (also the baseline the learned predictor is compared with).
- roofline, per operator (a mobile NPU): each compute node takes the longer of its arithmetic at the device's
  peak (int8 or float, by whether the node runs in int8) and its bytes at the memory bandwidth, plus a fixed
  per-operator dispatch overhead; data-movement nodes take their bytes at the bandwidth. In a QDQ graph the
  QuantizeLinear/DequantizeLinear/Relu nodes an int8 kernel absorbs (`qdq_fusion`) cost nothing of their own,
  and neither do the Q/DQ pairs around float operators: an NPU compiler converts at the boundary of the
  operator it schedules (ONNX Runtime on a CPU runs them as operators; an NPU does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from condenser.targets.graph import DATA_MOVEMENT, Graph, qdq_fusion


def opcount_latency(graph: Graph, ms_per_mop: float, overhead_ms: float) -> float:
    """MicroNets' estimate in milliseconds: `overhead_ms + ms_per_mop x` the graph's ops in millions."""
    return overhead_ms + ms_per_mop * graph.ops / 1e6


def fit_opcount(graphs: Sequence[Graph], latencies_ms: Sequence[float]) -> tuple[float, float]:
    """(ms_per_mop, overhead_ms) minimising the squared error of `opcount_latency` on the measured pairs.
    Needs at least two graphs of different op counts."""
    if len(graphs) != len(latencies_ms):
        raise ValueError(f"{len(graphs)} graphs but {len(latencies_ms)} latencies; give one latency per graph")
    mops = np.array([g.ops / 1e6 for g in graphs], dtype=float)
    if len(np.unique(mops)) < 2:
        raise ValueError("fitting latency against op count needs graphs of at least two different op counts")
    design = np.stack([mops, np.ones_like(mops)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, np.asarray(latencies_ms, dtype=float), rcond=None)
    return float(slope), float(intercept)


@dataclass(frozen=True)
class Roofline:
    """A device for the roofline: peak arithmetic rates (ops per second) in int8 and in float, memory
    bandwidth (bytes per second) and the fixed cost of launching one operator (microseconds)."""

    int8_ops_per_s: float
    float_ops_per_s: float
    bytes_per_s: float
    op_overhead_us: float

    def __post_init__(self):
        rates = {"int8_ops_per_s": self.int8_ops_per_s, "float_ops_per_s": self.float_ops_per_s,
                 "bytes_per_s": self.bytes_per_s}
        bad = [f"{name}={value}" for name, value in rates.items() if not value > 0]
        if not self.op_overhead_us >= 0:
            bad.append(f"op_overhead_us={self.op_overhead_us}")
        if bad:
            raise ValueError("roofline device: rates must be positive and the overhead not negative "
                             f"({', '.join(bad)})")


def roofline_latency(graph: Graph, device: Roofline) -> tuple[float, list[dict]]:
    """Total milliseconds of `graph` on `device` and one row per node that costs time:
    {"node", "op", "ms", "bound": "compute" | "memory"} (see the module's docstring)."""
    absorbed = qdq_fusion(graph).absorbed
    rows = []
    for i, node in enumerate(graph.nodes):
        if i in absorbed or node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        memory_s = (node.input_bytes + node.output_bytes + node.weight_bytes) / device.bytes_per_s
        if node.op in DATA_MOVEMENT:
            rows.append({"node": node.name, "op": node.op, "ms": memory_s * 1e3, "bound": "memory"})
            continue
        compute_s = node.ops / (device.int8_ops_per_s if node.quantized else device.float_ops_per_s)
        bound = "compute" if compute_s >= memory_s else "memory"
        ms = max(compute_s, memory_s) * 1e3 + device.op_overhead_us / 1e3
        rows.append({"node": node.name, "op": node.op, "ms": ms, "bound": bound})
    return sum(r["ms"] for r in rows), rows
