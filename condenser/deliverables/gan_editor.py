"""`gan_editor`: a merged single-concept editor (a lora@<concept> `merged/` folder).

The generator takes an image and returns the edit, its concept fixed (`GeneratorConfig.default`).
Its data folder is the concept's pairs (a distill_data/<concept> folder, with `concept.json`).
Calibration and fine-tuning use the training sources; evaluation edits the held-out test-split sources
and scores the edits against the teacher's (PSNR, SSIM) and with the judge (concept accuracy, content
preservation), as the lora stage does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from condenser.compress.sparse.filters import SIDECAR, FilterSpec, load_resized, write_sidecar
from condenser.core.errors import ConfigError
from condenser.core.io import read_json
from condenser.data.pairs import EditPairs, load_pairs, read_concept
from condenser.deliverables.base import Deliverable, Deployed, Inputs, Kind
from condenser.models.editor import (
    GENERATOR_CONFIG,
    GENERATOR_WEIGHTS,
    Generator,
    GeneratorConfig,
    edit_images,
    load_generator,
    save_model,
)
from condenser.models.judge import load_judge
from condenser.quality import edit_quality


class _DeployedEditor(Deployed):
    """The exported editor takes only the image: its concept is fixed (the config's default)."""

    def forward(self, x: torch.Tensor, concept: torch.Tensor | None = None) -> torch.Tensor:
        default = self.model.concept_index(None)
        if concept is not None and bool((concept != default).any()):
            raise ValueError("the deployed editor edits only its own concept")
        return self.run((x,))


class GanEditor(Kind):
    name = "gan_editor"
    output_names = ("edit",)
    quality = {"psnr": "higher", "ssim": "higher", "concept_accuracy": "higher", "content_preservation": "higher"}

    def load(self, path: Path) -> Generator:
        path = Path(path)
        generator = self._load_pruned(path) if (path / SIDECAR).is_file() else load_generator(path)
        if generator.config.default is None:
            raise ValueError(f"{path}: a multi-concept base generator, not a single-concept editor; point the "
                             "deliverable at a lora@<concept> merged/ folder")
        return generator

    def _load_pruned(self, folder: Path) -> Generator:
        """A filter-pruned editor: its config describes the dense generator, its weights a narrower one."""
        raw = read_json(folder / GENERATOR_CONFIG)
        dense = Generator(GeneratorConfig(**{**raw, "concepts": tuple(raw["concepts"])}))
        return load_resized(dense, load_file(str(folder / GENERATOR_WEIGHTS)), folder, self.filter_spec(dense).fix)

    def save(self, model: nn.Module, dest: Path, source: Path) -> None:
        save_model(model, dest)
        write_sidecar(model, lambda: Generator(model.config), dest)

    def filter_spec(self, model: nn.Module) -> FilterSpec:
        """The output conv keeps its 3 channels and the concept codes their width (the config's code_dim,
        which a new concept's code is grown from); everything else thins evenly."""
        return FilterSpec(ignored=[model.out, model.codes])

    def _concept(self, deliverable: Deliverable) -> str:
        concept = self.load(deliverable.path).config.default
        spec = read_concept(deliverable.data)
        if spec.name != concept:
            raise ConfigError(f"deliverables.{deliverable.name}.data: {deliverable.data} holds the pairs of concept "
                             f"'{spec.name}', but the editor at {deliverable.path} edits '{concept}'; point data "
                             f"at data/distill_data/{concept}")
        return concept

    def _pairs(self, deliverable: Deliverable, file: str) -> EditPairs:
        return load_pairs(deliverable.data, self._concept(deliverable), file)

    def example_inputs(self, deliverable: Deliverable) -> Inputs:
        return {"image": self._pairs(deliverable, "heldout.safetensors").sources[:1].clone()}

    def calibration_batches(self, deliverable: Deliverable, n: int, batch_size: int = 16,
                            seed: int = 0) -> Iterator[Inputs]:
        sources = self._pairs(deliverable, "pairs.safetensors").sources
        rows = np.sort(np.random.default_rng(seed).choice(len(sources), size=min(n, len(sources)), replace=False))
        for start in range(0, len(rows), batch_size):
            yield {"image": sources[torch.as_tensor(rows[start:start + batch_size])]}

    rewindable = True

    def initialization(self, model: nn.Module, seed: int) -> Generator:
        """The generator as gan_base built it before training: gan_base seeds with `seed` (gan_base.seed)
        and builds the generator first, so building it again the same way gives the same weights. Exact
        for a concept the base was trained on; a concept added by lora has one more code row, which
        shifts the random stream of every layer after it."""
        from accelerate.utils import set_seed

        set_seed(seed)
        return Generator(model.config).eval()

    def deployed(self, model: nn.Module, run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> nn.Module:
        return _DeployedEditor(model, run)

    def error(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 to the dense editor's edit, per example: the L1 term of the editor's own (pix2pix) objective."""
        return (output - target).abs().flatten(1).mean(1)

    def samples(self, model: nn.Module, deliverable: Deliverable, n: int) -> dict[str, torch.Tensor]:
        heldout = self._pairs(deliverable, "heldout.safetensors")
        heldout = heldout.subset(range(min(n, len(heldout))))
        edits = edit_images(model, heldout.sources, self._concept(deliverable), model.config.concepts)
        return {"source": (heldout.sources + 1) / 2, "teacher": (heldout.edits + 1) / 2, "model": edits}

    def evaluate(self, model: nn.Module, deliverable: Deliverable, limit: int | None = None) -> dict:
        concept = self._concept(deliverable)
        heldout = self._pairs(deliverable, "heldout.safetensors")
        if limit:
            heldout = heldout.subset(range(min(limit, len(heldout))))
        spec = read_concept(deliverable.data)
        judge, _ = load_judge(deliverable.paths.data("evaluator"))
        edits = edit_images(model, heldout.sources, concept, model.config.concepts)
        return edit_quality(edits, heldout, judge, spec.head)
