"""Running and estimating the deployed files of one deliverable on one target.

Measured targets run the files: `cpu` with ONNX Runtime, `mobile` with ExecuTorch/XNNPACK (the phone
runtime, on this machine's CPU), `cuda` with PyTorch on a CUDA device (ONNX Runtime here has only its CPU
provider, and no int8 CUDA runtime is installed: cuda validates the float levels). The levels of a
deliverable are timed side by side (`compare_calls`), so their ratios are fair on a shared machine, and
each is compared with the PyTorch model it came from (parity).

Virtual targets estimate from the ONNX graph: op count (MicroNets), per-operator roofline, the learned
predictor (PerfSAGE), or the layer-pipelined dataflow accelerator sparse's hass method searches against
(the same `Dataflow` model, so the search and the gate cannot disagree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condenser.core.config import MeasuredTarget, VirtualTarget
from condenser.deliverables import Deliverable
from condenser.runtime.measure import Latency, compare_calls, output_parity

Runner = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass
class Level:
    """One compression level of a deliverable as deployed: its PyTorch model (for int8, the float model it
    was quantized from: parity then measures the whole deployment error) and its files."""

    name: str          # dense | sparse | int8
    variant: str       # dense | the sparse method | the quantize scheme
    model: nn.Module
    onnx: Path | None
    pte: Path | None
    quality: dict      # the kind's quality metrics of this level on this target's runtime
    profile: dict      # params and non-zero params, as the stage that made the level counted them


def runner(target: MeasuredTarget, level: Level, names: list[str], exportable: nn.Module) -> Runner:
    """The level's first output for a batch of inputs, computed by the target's runtime (`exportable`: the
    level's model as exported, tensors in and out: what cuda runs)."""
    if target.kind == "onnxruntime":
        from condenser.runtime.onnx import onnx_runner

        return onnx_runner(level.onnx, names, threads=target.threads)
    if target.kind == "executorch":
        from condenser.runtime.executorch import pte_runner

        return pte_runner(level.pte)
    model = exportable.to("cuda").eval()

    def run(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return model(*(t.to("cuda") for t in inputs)).float().cpu()
    return run


def latencies(target: MeasuredTarget, levels: list[Level], example: dict[str, torch.Tensor],
              kind_exportable: Callable[[nn.Module], nn.Module]) -> dict[str, Latency]:
    """Batch-1 latency of every level on the target, timed side by side."""
    if target.kind == "onnxruntime":
        from condenser.runtime.measure import compare_latency

        feed = {k: v.numpy() for k, v in example.items()}
        return compare_latency({lv.name: lv.onnx for lv in levels}, feed, target.repeats, threads=target.threads)
    if target.kind == "executorch":
        from condenser.runtime.executorch import compare_pte_latency

        return compare_pte_latency({lv.name: lv.pte for lv in levels}, tuple(example.values()), target.repeats,
                                   threads=target.threads)
    inputs = tuple(t.to("cuda") for t in example.values())
    models = {lv.name: kind_exportable(lv.model).to("cuda").eval() for lv in levels}

    def call(model: nn.Module) -> Callable[[], None]:
        def once() -> None:
            with torch.no_grad():
                model(*inputs)
            # Kernels launch asynchronously: the call ends when the device is done.
            torch.cuda.synchronize()
        return once
    return compare_calls({name: call(m) for name, m in models.items()}, target.repeats, threads=target.threads)


def parity(run: Runner, reference: nn.Module, kind_forward: Callable, inputs: dict[str, torch.Tensor]) -> dict:
    """The deployed output against the PyTorch model's on the same inputs."""
    with torch.no_grad():
        expected = kind_forward(reference, inputs)
    return output_parity(run(tuple(inputs.values())), expected)


def estimate(target: VirtualTarget, graph, level: Level, exportable: nn.Module, example: dict[str, torch.Tensor],
             predictor=None) -> tuple[float, dict]:
    """The virtual target's latency of one level (ms) and how it was reached."""
    if target.estimator == "opcount":
        from condenser.targets.estimate import opcount_latency

        c = target.opcount
        return opcount_latency(graph, c.ms_per_mop, c.overhead_ms), {"ops": graph.ops, "macs": graph.macs}
    if target.estimator == "roofline":
        from condenser.targets.estimate import Roofline, roofline_latency

        r = target.roofline
        total, rows = roofline_latency(graph, Roofline(int8_ops_per_s=r.int8_tops * 1e12,
                                                       float_ops_per_s=r.float_tops * 1e12,
                                                       bytes_per_s=r.bandwidth_gbps * 1e9,
                                                       op_overhead_us=r.op_overhead_us))
        bound = sum(row["ms"] for row in rows if row["bound"] == "memory")
        return total, {"memory_bound_ms": bound, "compute_bound_ms": total - bound}
    if target.estimator == "predictor":
        if predictor is None:
            raise FileNotFoundError("the predictor stage's model (data/predictor/model) is missing: run "
                                    "`dvc repro predictor` first")
        use = target.predictor
        predicted = predictor.predict(graph)[use.target]["latency_ms"]
        return predicted * use.scale, {"predicted": use.target, "scale": use.scale}
    from condenser.compress.sparse.hass import Dataflow, dataflow_estimate

    d = target.dataflow
    schedule = dataflow_estimate(exportable, example, Dataflow(d.units, d.clock_mhz), inner=level.model)
    # A pipelined accelerator delivers one inference per interval of its slowest layer: that is the
    # latency a stream of frames sees (the first frame also fills the pipeline).
    return 1000.0 / schedule.throughput, {"bottleneck": schedule.bottleneck, "interval_cycles": schedule.interval,
                                          "throughput_per_s": schedule.throughput}


def sample_grid(d: Deliverable, levels: list[Level], runs: dict[str, Runner], n: int) -> tuple[torch.Tensor, int]:
    """Rows of images: the references (an editor's sources and the teacher's edits; real images for the
    student), then each level's outputs as its runtime computes them, on the same inputs; and the row
    length (n, or fewer when the deliverable has fewer held-out examples)."""
    kind = d.kind
    rows = None
    for lv in levels:
        out = kind.samples(kind.deployed(lv.model, runs[lv.name]), d, n)
        if rows is None:
            rows = [v for k, v in out.items() if k != "model"]
        rows.append(out["model"])
    return torch.cat(rows), len(rows[0])
