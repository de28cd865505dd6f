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
