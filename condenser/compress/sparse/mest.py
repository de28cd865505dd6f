"""MEST: Memory-Economic Sparse Training (Yuan et al., NeurIPS 2021), as a hook on the training loop.

The model is sparse from the start and stays sparse: every `update_every` steps a mutation swaps some
surviving weights for pruned ones, so the sparse structure keeps exploring without a dense phase.
- Elastic Mutation: the fraction of each layer's surviving weights swapped starts at `mutation` and
  decays (cosine) to zero at the end of training, so the structure settles as training converges.
- Soft Memory Bound: a mutation grows first (the pruned positions with the largest gradient magnitude,
  starting at zero) and prunes half an interval later (the smallest-magnitude surviving weights, grown
  ones included), so the newcomers get to compete; in between, sparsity dips below the target by at most
  `soft_bound` of each layer's weights, and pruning restores it exactly.
- Data efficiency: the loss of each example is recorded at each visit; after `forgetting_epochs` epochs
  the examples learned and never forgotten are dropped, so later epochs are shorter. MEST counts
  forgetting events of a classifier (correct -> wrong) among examples it once got right; for these
  regression losses, a rise of the loss between visits is the forgetting event, and learned means a
  last loss at or below the median (so at most half the examples go, the easier half).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from condenser.compress.sparse.masks import Masks, prunable, sparsity
from condenser.compress.sparse.train import TrainLog
from condenser.core.config import MestParams


class Mest:
    def __init__(self, model: nn.Module, masks: Masks, cfg: MestParams, total_steps: int):
        self.masks = {name: mask.clone() for name, mask in masks.items()}
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)
        self.target = {name: int(mask.sum()) for name, mask in self.masks.items()}
        self.grown: dict[str, int] = {}
        self.min_sparsity = sparsity(self.masks)
        self.mutations = 0

    def ratio(self, step: int) -> float:
        """Elastic Mutation: the swap fraction at `step`, cosine-decayed from `mutation` to 0."""
        return self.cfg.mutation * 0.5 * (1 + math.cos(math.pi * min(step / self.total_steps, 1.0)))

    def step(self, step: int, model: nn.Module) -> None:
        """The hook: grow at the start of each interval, prune back half an interval later."""
        half = self.cfg.update_every // 2
        if step > 0 and step % self.cfg.update_every == 0 and step + half < self.total_steps:
            self.grow(model, self.ratio(step))
        elif self.grown and step % self.cfg.update_every == half:
            self.prune(model)

    @torch.no_grad()
    def grow(self, model: nn.Module, ratio: float) -> None:
        layers = prunable(model)
        for name, mask in self.masks.items():
            weight = layers[name].weight
            bound = int(self.cfg.soft_bound * mask.numel())
            n = min(round(ratio * int(mask.sum())), bound, int((~mask).sum()))
            if n <= 0 or weight.grad is None:
                continue
            # Among pruned positions only: where the loss would fall fastest if the weight could move.
            score = weight.grad.abs().masked_fill(mask, -1.0).flatten()
            chosen = torch.topk(score, n).indices
            grown = mask.flatten().clone()
            grown[chosen] = True
            self.masks[name] = grown.view_as(mask)
            weight.view(-1)[chosen] = 0.0
            self.grown[name] = n
        if self.grown:
            self.mutations += 1
            self.min_sparsity = min(self.min_sparsity, sparsity(self.masks))

    @torch.no_grad()
    def prune(self, model: nn.Module) -> None:
        """Back to each layer's target count: drop its smallest-magnitude surviving weights."""
        layers = prunable(model)
        for name in self.grown:
            mask, weight = self.masks[name], layers[name].weight
            excess = int(mask.sum()) - self.target[name]
            if excess <= 0:
                continue
            score = weight.detach().abs().masked_fill(~mask, math.inf).flatten()
            drop = torch.topk(score, excess, largest=False).indices
            pruned = mask.flatten().clone()
            pruned[drop] = False
            self.masks[name] = pruned.view_as(mask)
        self.grown = {}

    def drop_never_forgotten(self, epoch: int, log: TrainLog, active: torch.Tensor) -> torch.Tensor:
        """The epoch hook: once, after `forgetting_epochs` epochs, drop the examples learned (last loss
        at or below the median) and never forgotten (no rise between consecutive visits)."""
        if epoch != self.cfg.forgetting_epochs:
            return active
        tolerance = self.cfg.forget_tolerance
        seen = [log.visits.get(i, []) for i in active.tolist()]
        last = torch.tensor([s[-1] if s else float("inf") for s in seen])
        learned = last <= last.median()
        forgotten = torch.tensor([any(b > a * (1 + tolerance) for a, b in zip(s, s[1:], strict=False)) for s in seen])
        keep = active[~(learned & ~forgotten)]
        log.dropped = len(active) - len(keep)
        return keep
