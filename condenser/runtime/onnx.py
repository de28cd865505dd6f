"""ONNX export and ONNX Runtime sessions.

The exported file is what ships on device, so export settings live in one place: every stage that
exports a model produces the same kind of file (legacy TorchScript exporter, opset 17, dynamic batch),
and every stage that runs one opens it the same way (CPU execution provider).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], dynamic_batch: bool = True, opset: int = 17) -> Path:
    """Export `model` (put in eval mode) traced on `example` to `path`; with `dynamic_batch`, dimension 0
    of every input and output is named "batch" and may vary at run time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
    # The legacy exporter (dynamo=False) warns about its own deprecation and about tracing; the file it
    # writes is the one the committed metrics were measured on, so it stays and its warnings are noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on the file at `path`; `threads` sets the intra-op thread count, None
    leaves ONNX Runtime's default (one thread per physical core)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; export the model to ONNX first")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, names: list[str], threads: int | None = None):
    """A function computing the file's first output for inputs given in `names`' order (tensors in, tensor
    out), the session created once: a deployed model stands in for the PyTorch one through it."""
    runner = session(path, threads)

    def run(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return torch.from_numpy(runner.run(None, feed)[0])
    return run


def op_profile(path: Path, feed: dict, runs: int = 50, threads: int | None = 1) -> dict:
    """Where one run of the ONNX file at `path` spends its time, per operator type (ONNX Runtime's own
    profiler, averaged over `runs` runs on `feed`): which operators run in integer arithmetic (QLinear*,
    *Integer), the quantize/dequantize pairs around the float ones, and the float ones themselves, which
    in a QDQ model are what stays out of int8 (GroupNorm exported as InstanceNormalization, Softmax, ...)."""
    import json
    import tempfile

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as scratch:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        runner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            runner.run(None, feed)
        events = json.loads(Path(runner.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / runs
    integer = {op: ms for op, ms in per_op.items() if op.startswith("QLinear") or "Integer" in op}
    qdq = {op: ms for op, ms in per_op.items() if op in ("QuantizeLinear", "DequantizeLinear")}
    floating = {op: ms for op, ms in per_op.items() if op not in integer and op not in qdq}
    total = sum(per_op.values()) or 1.0
    return {"per_op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1])), "integer_ms": sum(integer.values()),
            "qdq_ms": sum(qdq.values()), "float_ms": sum(floating.values()),
            "float_ops": sorted(floating, key=lambda op: -floating[op]),
            "share_outside_int8": (sum(qdq.values()) + sum(floating.values())) / total}
