"""A sparse variant's files and its measurement, the same for the stage, the benchmark and later stages.

Files: an unstructured variant ships as values + bitmask (`weights.sparse.safetensors`, restored into
the source deliverable's architecture); a filter-pruned one as the deliverable's own format, smaller,
plus its ONNX file. Measurement: one side of the compression metrics contract.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from condenser.compress.contract import block, profile
from condenser.compress.sparse.masks import prunable
from condenser.compress.sparse.methods import Variant, layer_macs
from condenser.compress.sparse.storage import load_sparse, save_sparse, sparse_bytes
from condenser.deliverables.base import Deliverable, Inputs, Kind
from condenser.runtime.measure import compare_latency
from condenser.runtime.onnx import export_onnx

SPARSE_FILE = "weights.sparse.safetensors"
ONNX_FILE = "model.onnx"
# The variant `sparse.chain` names, in the deliverable's own format: what quantize loads.
CHAIN = "chain"


def export(kind: Kind, model: nn.Module, example: Inputs, path: Path) -> Path:
    return export_onnx(kind.exportable(model), tuple(example.values()), path, list(example), list(kind.output_names))


def save_variant(kind: Kind, variant: Variant, folder: Path, source: Path, example: Inputs) -> None:
    if variant.structured:
        kind.save(variant.model, folder, source=source)
        export(kind, variant.model, example, folder / ONNX_FILE)
    else:
        save_sparse(variant.model, folder / SPARSE_FILE)


def load_variant(kind: Kind, folder: Path, source: Path) -> nn.Module:
    """The model a variant folder holds: unstructured weights restored into the source deliverable's
    architecture, or the smaller filter-pruned model."""
    folder = Path(folder)
    if (folder / SPARSE_FILE).is_file():
        model = kind.load(source)
        model.load_state_dict(load_sparse(folder / SPARSE_FILE))
        return model.eval()
    return kind.load(folder)


def measure(kind: Kind, d: Deliverable, models: dict[str, tuple[nn.Module, bool]], example: Inputs, scratch: Path,
            repeats: int, threads: int | None = 1) -> dict[str, dict]:
    """One side of the contract for each named (model, structured): quality, profile (size = the shipped
    file's bytes: values + bitmask unless the model is dense or physically smaller), non-zero MACs (what
    a sparse accelerator executes: each prunable layer's MACs times its density), and ONNX Runtime CPU
    latency at batch 1 on `threads` intra-op threads, all models timed side by side
    (condenser.runtime.measure.compare_latency)."""
    sides, files = {}, {}
    for name, (model, structured) in models.items():
        prof = profile(kind.exportable(model), tuple(example.values()))
        if not structured:
            prof["size_bytes"] = sparse_bytes(model.state_dict())
        macs = layer_macs(kind, model, example)
        skipped = sum(macs[n] * (1 - int(torch.count_nonzero(m.weight)) / m.weight.numel())
                      for n, m in prunable(model).items())
        prof["nonzero_macs"] = int(round(prof["macs"] - skipped))
        files[name] = export(kind, model, example, Path(scratch) / f"{name}.onnx")
        sides[name] = (kind.evaluate(model, d), prof)
    timings = compare_latency(files, {k: v.numpy() for k, v in example.items()}, repeats, threads=threads)
    return {name: block(quality, prof, {"onnxruntime": timings[name]}) for name, (quality, prof) in sides.items()}
