"""The deliverables registry on real tiny deliverables: a step_distill student and a lora merged editor.

Each kind round-trips save/load bit-exactly (and the saved folder loads with the deliverable's own
loader), evaluates on tiny held-out data, yields calibration batches (the student's across more than
one timestep of its sampler), exports to ONNX matching PyTorch, and has a fine-tuning loss that is zero
against itself and grows when the weights move.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch

from condenser.core.config import DeliverableKind, DeliverableParams, load_params, parse_params
from condenser.core.io import StagePaths
from condenser.deliverables import KINDS, deliverable, deliverables
from condenser.runtime.measure import parity
from condenser.runtime.onnx import export_onnx
from tests.conftest import ROOT, tiny_params

SOURCES = {"sd_unet": "data/step_distill", "gan_editor": "data/lora/bold/merged"}
DATA = {"sd_unet": "data/prepare", "gan_editor": "data/distill_data/bold"}


@pytest.fixture(scope="module")
def project(deliverables_root: Path) -> Path:
    return deliverables_root


def _deliverable(project: Path, kind: str):
    return deliverable(f"tiny_{kind}", DeliverableParams(kind=kind, path=SOURCES[kind], data=DATA[kind]), StagePaths(project))


def test_kinds_are_exactly_what_params_may_name():
    assert set(KINDS) == set(get_args(DeliverableKind))
    found = deliverables(load_params(ROOT / "params.yaml"), StagePaths(ROOT))
    assert {d.kind.name for d in found.values()} == {"sd_unet", "gan_editor"}
    assert found["student"].path == ROOT / "data" / "step_distill"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_and_load_round_trip_bit_exactly(project: Path, kind: str, tmp_path: Path):
    d = _deliverable(project, kind)
    model = d.kind.load(d.path)
    d.kind.save(model, tmp_path / "copy", source=d.path)
    again = d.kind.load(tmp_path / "copy")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    inputs = d.kind.example_inputs(d)
    with torch.no_grad():
        assert torch.equal(d.kind.forward(model, inputs), d.kind.forward(again, inputs))
    # The copy also loads the way the deliverable's own users load it.
    if kind == "sd_unet":
        from condenser.models.teacher import load_checkpoint

        pipe = load_checkpoint(tmp_path / "copy")
        assert all(torch.equal(p, after[n]) for n, p in pipe.unet.state_dict().items())
        assert (tmp_path / "copy" / "condenser.json").is_file()
        assert not any(p.name.startswith("student_") for p in (tmp_path / "copy").iterdir())
    else:
        from condenser.models.editor import load_generator

        assert load_generator(tmp_path / "copy").config == model.config


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_evaluate_gives_the_kinds_quality_metrics(project: Path, kind: str):
    d = _deliverable(project, kind)
    metrics = d.kind.evaluate(d.kind.load(d.path), d, limit=8)
    assert set(metrics) == set(d.kind.quality)
    if kind == "sd_unet":
        assert metrics["fd"] > 0 and set(metrics["prompt_accuracy"]) == {"digit", "style", "color"}
        assert all(0 <= v <= 1 for v in metrics["prompt_accuracy"].values())
    else:
        assert 5 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1
        assert 0 <= metrics["concept_accuracy"] <= 1 and 0 <= metrics["content_preservation"] <= 1
        # The same protocol as the lora stage: its held-out score of this very editor, on the same pairs.
        from condenser.core.io import read_json

        stage = read_json(project / "metrics" / "lora" / "bold.json")["heldout"]["lora"]
        assert metrics["psnr"] == pytest.approx(stage["psnr"]) and metrics["ssim"] == pytest.approx(stage["ssim"])


def test_student_calibration_covers_every_timestep_of_its_sampler(project: Path):
    d = _deliverable(project, "sd_unet")
    unet = d.kind.load(d.path)
    steps = tiny_params()["step_distill"]["student_steps"]
    batches = list(d.kind.calibration_batches(d, n=6, batch_size=4))
    # Two caption batches (4 + 2) times one UNet call per sampler step.
    assert len(batches) == 2 * steps
    timesteps = {int(b["timestep"][0]) for b in batches}
    assert len(timesteps) == steps > 1
    assert sum(len(b["sample"]) for b in batches[::steps]) == 6
    for b in batches:
        assert b["sample"].shape[1:] == (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        assert len(b["timestep"]) == len(b["sample"]) == len(b["encoder_hidden_states"])
        assert b["encoder_hidden_states"].shape[-1] == unet.config.cross_attention_dim
    # The recorded inputs are the UNet's real inputs: running it on them works and is finite.
    with torch.no_grad():
        assert torch.isfinite(d.kind.forward(unet, batches[0])).all()


def test_editor_calibration_draws_training_sources(project: Path):
    d = _deliverable(project, "gan_editor")
    batches = list(d.kind.calibration_batches(d, n=10, batch_size=4))
    assert [len(b["image"]) for b in batches] == [4, 4, 2]
    images = torch.cat([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1 and len(torch.unique(images, dim=0)) == 10


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loss_against_the_dense_reference(project: Path, kind: str):
    d = _deliverable(project, kind)
    dense = d.kind.load(d.path)
    batch = next(iter(d.kind.calibration_batches(d, n=4, batch_size=4)))
    assert float(d.kind.loss(dense, dense, batch).detach()) == 0.0
    moved = d.kind.load(d.path)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    loss = d.kind.loss(moved, dense, batch)
    assert loss > 0 and loss.requires_grad


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_exported_onnx_matches_pytorch(project: Path, kind: str, tmp_path: Path):
    d = _deliverable(project, kind)
    model = d.kind.exportable(d.kind.load(d.path))
    inputs = d.kind.example_inputs(d)
    path = export_onnx(model, tuple(inputs.values()), tmp_path / "model.onnx", list(inputs),
                       list(d.kind.output_names))
    assert parity(model, path, inputs) < 1e-4
