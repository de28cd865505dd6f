"""`gan_editor`: a merged single-concept editor (a lora@<concept> `merged/` folder).

The generator takes an image and returns the edit, its concept fixed (`GeneratorConfig.default`).
Calibration and fine-tuning use the concept's training sources from distill_data; evaluation edits the
held-out test-split sources and scores the edits against the teacher's (PSNR, SSIM) and with the judge
(concept accuracy, content preservation), as the lora stage does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condenser.data.pairs import EditPairs, load_pairs, read_concept
from condenser.deliverables.base import Deliverable, Inputs, Kind
from condenser.models.editor import Generator, edit_images, load_generator, save_model
from condenser.models.judge import load_judge
from condenser.quality import edit_quality


class GanEditor(Kind):
    name = "gan_editor"
    output_names = ("edit",)
    quality = {"psnr": "higher", "ssim": "higher", "concept_accuracy": "higher", "content_preservation": "higher"}

    def load(self, path: Path) -> Generator:
        generator = load_generator(path)
        if generator.config.default is None:
            raise ValueError(f"{path}: a multi-concept base generator, not a single-concept editor; point the "
                             "deliverable at a lora@<concept> merged/ folder")
        return generator

    def save(self, model: nn.Module, dest: Path, source: Path) -> None:
        save_model(model, dest)

    def _pairs(self, deliverable: Deliverable, file: str) -> EditPairs:
        concept = load_generator(deliverable.path).config.default
        return load_pairs(deliverable.paths.data("distill_data", concept), concept, file)

    def example_inputs(self, deliverable: Deliverable) -> Inputs:
        return {"image": self._pairs(deliverable, "heldout.safetensors").sources[:1].clone()}

    def calibration_batches(self, deliverable: Deliverable, n: int, batch_size: int = 16,
                            seed: int = 0) -> Iterator[Inputs]:
        sources = self._pairs(deliverable, "pairs.safetensors").sources
        rows = np.sort(np.random.default_rng(seed).choice(len(sources), size=min(n, len(sources)), replace=False))
        for start in range(0, len(rows), batch_size):
            yield {"image": sources[torch.as_tensor(rows[start:start + batch_size])]}

    def loss(self, model: nn.Module, reference: nn.Module, inputs: Inputs) -> torch.Tensor:
        """L1 to the dense editor's edit: the L1 term of the editor's own (pix2pix) objective."""
        with torch.no_grad():
            target = reference(*inputs.values())
        return torch.nn.functional.l1_loss(model(*inputs.values()), target)

    def evaluate(self, model: nn.Module, deliverable: Deliverable, limit: int | None = None) -> dict:
        concept = load_generator(deliverable.path).config.default
        heldout = self._pairs(deliverable, "heldout.safetensors")
        if limit:
            heldout = heldout.subset(range(min(limit, len(heldout))))
        spec = read_concept(deliverable.paths.data("distill_data", concept))
        judge, _ = load_judge(deliverable.paths.data("evaluator"))
        edits = edit_images(model, heldout.sources, concept, model.config.concepts)
        return edit_quality(edits, heldout, judge, spec.head)
