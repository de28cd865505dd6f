"""Fine-tuning a sparse model against its dense reference, with its masks held.

Every sparse method trains the same way: the deliverable kind's loss against the dense model's outputs
(distillation from the dense reference) on the deliverable's own inputs, Adam, pruned weights held at
exactly zero. Methods differ in what they do between steps (gradual pruning, MEST's mutations), which
they plug in as a hook, and in which examples they keep (MEST drops never-forgotten ones).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from condenser.compress.sparse.masks import Masks, apply_masks, mask_gradients
from condenser.deliverables.base import Inputs, Kind


class Examples:
    """Model inputs as rows: the calibration batches concatenated, indexable per example."""

    def __init__(self, batches: Iterable[Inputs]):
        batches = list(batches)
        if not batches:
            raise ValueError("no calibration examples: the deliverable's data gave no inputs")
        self.rows = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def take(self, index: torch.Tensor | range) -> Inputs:
        index = torch.as_tensor(list(index) if isinstance(index, range) else index)
        return {key: rows[index] for key, rows in self.rows.items()}

    def subset(self, n: int | None) -> Examples:
        """The first `n` examples (all when None)."""
        if n is None or n >= len(self):
            return self
        subset = Examples.__new__(Examples)
        subset.rows = {key: rows[:n] for key, rows in self.rows.items()}
        return subset

    def batches(self, batch_size: int, limit: int | None = None) -> Iterable[Inputs]:
        n = min(limit or len(self), len(self))
        for start in range(0, n, batch_size):
            yield self.take(range(start, min(start + batch_size, n)))


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    # Per example: its loss at each visit (MEST's forgetting statistics).
    visits: dict[int, list[float]] = field(default_factory=dict)
    dropped: int = 0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "wall_time_s": self.seconds, "dropped_examples": self.dropped,
                "final_loss": self.losses[-1] if self.losses else None}


# Called after backward and before the optimizer step: (step, model). Gradients of pruned weights are
# still there (a grow step reads them); the loop masks them after the hook.
StepHook = Callable[[int, nn.Module], None]
# Called at the end of each epoch with the log; returns the example indices to keep training on.
EpochHook = Callable[[int, TrainLog, torch.Tensor], torch.Tensor]


def evaluate_loss(kind: Kind, model: nn.Module, reference: nn.Module, examples: Examples, batch_size: int,
                  limit: int | None = None) -> float:
    """Mean loss of `model` against `reference` over the first `limit` examples."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in examples.batches(batch_size, limit):
            losses = kind.example_losses(model, reference, batch)
            total += float(losses.sum())
            count += len(losses)
    return total / max(count, 1)


def finetune(kind: Kind, model: nn.Module, reference: nn.Module, examples: Examples, steps: int, lr: float,
             batch_size: int, seed: int, masks: Callable[[], Masks] | None = None, step_hook: StepHook | None = None,
             epoch_hook: EpochHook | None = None, epochs: int | None = None, desc: str = "sparse") -> TrainLog:
    """Train `model` in place against `reference` on `examples`.

    Runs `steps` optimizer steps, or `epochs` passes over the kept examples when given (MEST: dropping
    examples shortens the epochs, which is its time saving). `masks()` gives the current masks (a method
    may change them between steps); pruned weights are exactly zero after every step."""
    generator = torch.Generator().manual_seed(seed)
    reference.eval()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    log = TrainLog()
    active = torch.arange(len(examples))
    total = steps if epochs is None else epochs * math.ceil(len(examples) / batch_size)
    if masks is not None:
        apply_masks(model, masks())
    start = time.perf_counter()
    epoch = 0
    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        while (epochs is None and log.steps < steps) or (epochs is not None and epoch < epochs):
            order = active[torch.randperm(len(active), generator=generator)]
            for first in range(0, len(order), batch_size):
                if epochs is None and log.steps >= steps:
                    break
                index = order[first:first + batch_size]
                losses = kind.example_losses(model, reference, examples.take(index))
                for i, value in zip(index.tolist(), losses.detach().tolist(), strict=True):
                    log.visits.setdefault(i, []).append(value)
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                if step_hook is not None:
                    step_hook(log.steps, model)
                if masks is not None:
                    mask_gradients(model, masks())
                optimizer.step()
                if masks is not None:
                    apply_masks(model, masks())
                log.losses.append(float(losses.detach().mean()))
                log.steps += 1
                bar.update()
            epoch += 1
            if epoch_hook is not None:
                active = epoch_hook(epoch, log, active)
    log.seconds = time.perf_counter() - start
    model.eval()
    return log
