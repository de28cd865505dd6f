"""What every deliverable kind provides: the interface the compression stages are written against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condenser.compress.sparse.filters import FilterSpec
from condenser.core.io import StagePaths

# A batch of model inputs keyed by name: the forward pass's arguments in order, and the ONNX input names.
Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Deliverable:
    """One entry of params.yaml's `deliverables`: a name, its kind, its folder, its data folder (what the
    kind calibrates, fine-tunes and evaluates on), and the project it lives in (for the judge)."""

    name: str
    kind: Kind
    path: Path
    data: Path
    paths: StagePaths


class Kind(ABC):
    """One kind of deliverable. `load` returns the part that compression changes (the student's UNet, the
    editor's generator); everything else about the deliverable is the kind's business."""

    name: str
    # The names of the exported model's outputs (its inputs are the keys of `example_inputs`).
    output_names: tuple[str, ...]
    # The kind's quality metrics (what `evaluate` returns) and which way is better.
    quality: dict[str, str]

    @abstractmethod
    def load(self, path: Path) -> nn.Module:
        """The model in eval mode, from a folder `save` (or the stage that made the deliverable) wrote."""

    @abstractmethod
    def save(self, model: nn.Module, dest: Path, source: Path) -> None:
        """Write `model` into `dest` so that `dest` loads like `source` does (with the kind's `load` and
        with the deliverable's own loader), taking whatever else the deliverable needs from `source`."""

    @abstractmethod
    def example_inputs(self, deliverable: Deliverable) -> Inputs:
        """Batch-1 inputs of the right shapes and dtypes: for export and profiling."""

    @abstractmethod
    def calibration_batches(self, deliverable: Deliverable, n: int, batch_size: int = 16,
                            seed: int = 0) -> Iterator[Inputs]:
        """Inputs as the model meets them in use, from about `n` training examples: what quantization
        ranges and sparse fine-tuning are computed on."""

    @abstractmethod
    def evaluate(self, model: nn.Module, deliverable: Deliverable, limit: int | None = None) -> dict:
        """The kind's quality metrics (keys of `quality`) of `model` in place of the deliverable's own,
        on held-out data; `limit` caps the number of held-out examples (tests)."""

    # Whether `initialization` can give the weights training started from (lottery-ticket rewinding).
    rewindable: bool = False

    @abstractmethod
    def samples(self, model: nn.Module, deliverable: Deliverable, n: int) -> dict[str, torch.Tensor]:
        """Images for people to look at ([n, 3, H, W] in [0, 1]), the same ones for every model of the
        deliverable: the model's own under "model", and the references beside them (an editor's sources and
        the teacher's edits; the real images of the student's captions)."""

    def initialization(self, model: nn.Module, seed: int) -> nn.Module:
        """A model of `model`'s architecture holding the weights its training started from."""
        raise NotImplementedError(f"a {self.name} deliverable has no initial weights to rewind to")

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The model's output tensor on `inputs`."""
        return model(*inputs.values())

    def exportable(self, model: nn.Module) -> nn.Module:
        """A module whose forward takes the inputs positionally and returns the output tensor (ONNX)."""
        return model

    def deployed(self, model: nn.Module, run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> nn.Module:
        """A stand-in for `model` whose output comes from a runtime: `run` takes the exported model's
        positional inputs (the keys of `example_inputs`, in order) and returns its output. `evaluate` on it
        gives the quality of the deployed model, computed from the runtime's own outputs."""
        return Deployed(model, run)

    def filter_spec(self, model: nn.Module) -> FilterSpec:
        """What filter pruning (condenser.compress.sparse.filters) must know about `model`: by default
        nothing, since the layer producing the output keeps its width anyway. A kind adds the layers
        that must keep theirs (embeddings of fixed-size inputs), attention heads, split projections,
        and the attributes to restore once widths change."""
        return FilterSpec()

    def error(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per example, how far `output` is from the dense model's `target`: mean squared error."""
        return ((output.float() - target.float()) ** 2).flatten(1).mean(1)

    def example_losses(self, model: nn.Module, reference: nn.Module, inputs: Inputs) -> torch.Tensor:
        """Fine-tuning loss of `model` against the dense `reference` on `inputs`, one value per example
        (distillation from the dense model, as sparse and quantization-aware fine-tuning use it)."""
        with torch.no_grad():
            target = self.forward(reference, inputs)
        return self.error(self.forward(model, inputs), target)

    def loss(self, model: nn.Module, reference: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The mean of `example_losses` over the batch."""
        return self.example_losses(model, reference, inputs).mean()


class Deployed(nn.Module):
    """`model`'s attributes (config, ...) with its forward computed by a runtime: the positional inputs
    go to `run` as they are (a kind whose model takes other arguments overrides `Kind.deployed`)."""

    def __init__(self, model: nn.Module, run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.run = run

    @property
    def config(self):
        return self.model.config

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(inputs)
