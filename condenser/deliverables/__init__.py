"""Deliverables: the models the compression stages work on, each kind described once.

`params.yaml` lists the deliverables (`deliverables: {name: {kind, path, data}}`) and the compression stages
iterate over them (`foreach: ${deliverables}`). Everything a stage needs to know about a model comes
from its kind, so `sparse`, `quantize` and `validate` never ask which model they hold:

    d = deliverable(name, params.deliverables[name], paths)
    model = d.kind.load(d.path)                               # the part that is compressed
    inputs = d.kind.example_inputs(d)                         # batch 1, keyed by ONNX input name
    for batch in d.kind.calibration_batches(d, n):            # real inputs, as the model sees them
        loss = d.kind.loss(model, dense, batch)               # fine-tuning against the dense reference
    d.kind.save(model, out_dir, source=d.path)                # a folder that loads like the source
    metrics = d.kind.evaluate(model, d)                       # the kind's quality metrics

A new kind is one module with one `Kind` subclass and one entry in `KINDS` (and in
condenser.core.config.DeliverableKind, so params.yaml may name it).
"""

from __future__ import annotations

from condenser.core.config import DeliverableParams, Params
from condenser.core.errors import ConfigError
from condenser.core.io import StagePaths
from condenser.deliverables.base import Deliverable, Kind
from condenser.deliverables.gan_editor import GanEditor
from condenser.deliverables.sd_unet import SdUnet

KINDS: dict[str, Kind] = {"sd_unet": SdUnet(), "gan_editor": GanEditor()}


def deliverable(name: str, spec: DeliverableParams, paths: StagePaths) -> Deliverable:
    if spec.kind not in KINDS:
        raise ConfigError(f"deliverables.{name}.kind: '{spec.kind}' has no entry in condenser.deliverables.KINDS "
                          f"({', '.join(KINDS)})")
    return Deliverable(name=name, kind=KINDS[spec.kind], path=paths.root / spec.path, data=paths.root / spec.data,
                       paths=paths)


def deliverables(params: Params, paths: StagePaths) -> dict[str, Deliverable]:
    return {name: deliverable(name, spec, paths) for name, spec in params.deliverables.items()}


__all__ = ["KINDS", "Deliverable", "Kind", "deliverable", "deliverables"]
