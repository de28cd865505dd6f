"""The sparse methods, each a function from its params entry to the variants it makes.

`METHODS` maps a `sparse.methods.<name>.kind` to its function; every function takes the method's params
and a `Context` (the deliverable, its dense model, its examples, the shared training settings) and
returns one `Variant` per model it made: the method's own, and the comparison the seed asks for where
the params ask for it (lottery ticket beside prune & fine-tune, MEST keeping all examples beside MEST
dropping, uniform beside HASS).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from condenser.compress.sparse import filters, hass
from condenser.compress.sparse.masks import Masks, apply_masks, magnitude_masks, prunable, sparsity
from condenser.compress.sparse.mest import Mest
from condenser.compress.sparse.sensitivity import Sensitivity, measure_sensitivity
from condenser.compress.sparse.train import Examples, finetune
from condenser.core.config import FilterParams, HassParams, MestParams, PruneFinetuneParams, SparseMethod, SparseParams
from condenser.deliverables.base import Deliverable, Inputs


@dataclass
class Context:
    deliverable: Deliverable
    dense: nn.Module
    examples: Examples
    example: Inputs
    cfg: SparseParams
    # The seed the deliverable's architecture was initialised with (lottery-ticket rewinding).
    init_seed: int = 0

    @property
    def kind(self):
        return self.deliverable.kind

    @cached_property
    def sensitivity(self) -> Sensitivity:
        return measure_sensitivity(self.kind, self.dense, self.examples, self.cfg.sensitivity.levels,
                                   self.cfg.sensitivity.examples, self.cfg.batch_size)

    def train(self, model: nn.Module, method: SparseMethod, masks: Callable[[], Masks] | None, desc: str,
              examples: Examples | None = None, **kwargs):
        """Fine-tune `model` for the method's steps at its lr (default sparse.lr)."""
        return finetune(self.kind, model, self.dense, examples or self.examples, method.steps,
                        method.lr or self.cfg.lr, self.cfg.batch_size, self.cfg.seed, masks=masks, desc=desc,
                        **kwargs)


@dataclass
class Variant:
    name: str
    method: str
    model: nn.Module
    # Physically smaller (filter pruning): stored as an ordinary model, not as values + bitmask.
    structured: bool = False
    details: dict = field(default_factory=dict)


def layer_macs(kind, model: nn.Module, example: Inputs) -> dict[str, int]:
    """Dense MACs of each prunable layer of `model` (named as in `prunable(model)`), counted on the
    kind's exportable form, the forward that is deployed."""
    counted = hass.layer_macs(kind.exportable(model), example, inner=model)
    return {n: counted.get(n, 0) for n in prunable(model)}


def cubic_schedule(step: int, final: float, prune_steps: int, prune_every: int) -> float:
    """Gradual pruning (Zhu & Gupta 2017): sparsity final * (1 - (1 - t/T)^3), raised every prune_every
    steps, so most weights go early, while the network can still recover, and the last few gently."""
    t = min(step - step % prune_every + prune_every, prune_steps)
    return final * (1 - (1 - t / prune_steps) ** 3)


def prune_finetune(name: str, cfg: PruneFinetuneParams, ctx: Context) -> list[Variant]:
    model = copy.deepcopy(ctx.dense)
    state = {"masks": magnitude_masks(model, 0.0, "layer")}

    def prune(step: int, m: nn.Module) -> None:
        if step % cfg.prune_every == 0 and step < cfg.prune_steps:
            state["masks"] = magnitude_masks(m, cubic_schedule(step, cfg.sparsity, cfg.prune_steps, cfg.prune_every),
                                             cfg.scope)

    log = ctx.train(model, cfg, lambda: state["masks"], f"{name}: prune & fine-tune", step_hook=prune)
    variants = [Variant(name, cfg.kind, model, details={"train": log.to_dict(), "target_sparsity": cfg.sparsity,
                                                        "achieved_sparsity": sparsity(state["masks"])})]
    if cfg.compare_lottery and ctx.kind.rewindable:
        variants.append(lottery_ticket(f"{name}.lottery", cfg, ctx))
    return variants


def lottery_ticket(name: str, cfg: PruneFinetuneParams, ctx: Context) -> Variant:
    """Frankle & Carbin: prune the trained dense model once by magnitude, reset the surviving weights to
    their initial values, retrain for the same steps prune & fine-tune had (same total epochs)."""
    masks = magnitude_masks(ctx.dense, cfg.sparsity, cfg.scope)
    model = ctx.kind.initialization(ctx.dense, ctx.init_seed)
    final = torch.cat([m.weight.detach().flatten() for m in prunable(ctx.dense).values()])
    start = torch.cat([m.weight.detach().flatten() for m in prunable(model).values()])
    keep = torch.cat([mask.flatten() for mask in masks.values()])
    # The seed's explanation of when tickets win: surviving weights' initial and trained values correlate.
    correlation = float(torch.corrcoef(torch.stack([start[keep], final[keep]]))[0, 1])
    apply_masks(model, masks)
    log = ctx.train(model, cfg, lambda: masks, f"{name}: lottery ticket")
    return Variant(name, "lottery_ticket", model, details={"train": log.to_dict(), "target_sparsity": cfg.sparsity,
                                                           "achieved_sparsity": sparsity(masks),
                                                           "init_final_correlation": correlation})


def mest(name: str, cfg: MestParams, ctx: Context) -> list[Variant]:
    variants = [_mest_run(name, cfg, ctx, drop=cfg.drop)]
    if cfg.compare_keep_all:
        keep = _mest_run(f"{name}.keep_all", cfg, ctx, drop=False)
        mine = variants[0].details["train"]
        variants[0].details["time_saved"] = 1 - mine["wall_time_s"] / max(keep.details["train"]["wall_time_s"], 1e-9)
        variants[0].details["steps_saved"] = 1 - mine["steps"] / max(keep.details["train"]["steps"], 1)
        variants.append(keep)
    return variants


def _mest_run(name: str, cfg: MestParams, ctx: Context, drop: bool) -> Variant:
    model = copy.deepcopy(ctx.dense)
    # Sparse from the start: the dense model's magnitude masks at the target, then only mutations.
    run = Mest(model, magnitude_masks(model, cfg.sparsity, "layer"), cfg, total_steps=cfg.steps)
    # MEST counts epochs: its own subset of the examples, passed over enough times for `steps` steps.
    examples = ctx.examples.subset(cfg.examples)
    epochs = max(1, math.ceil(cfg.steps * ctx.cfg.batch_size / len(examples)))
    log = ctx.train(model, cfg, lambda: run.masks, f"{name}: MEST", step_hook=run.step,
                    epoch_hook=run.drop_never_forgotten if drop else None, epochs=epochs, examples=examples)
    if run.grown:  # training ended inside a mutation: restore the target before saving
        run.prune(model)
        apply_masks(model, run.masks)
    return Variant(name, cfg.kind, model, details={"train": log.to_dict(), "target_sparsity": cfg.sparsity,
                                                   "achieved_sparsity": sparsity(run.masks),
                                                   "examples": len(examples), "dropping": drop,
                                                   "min_sparsity_during_training": run.min_sparsity,
                                                   "mutations": run.mutations})


def filter_prune(name: str, cfg: FilterParams, ctx: Context) -> list[Variant]:
    model = filters.prune_filters(ctx.dense, ctx.example, cfg.ratio, ctx.kind.filter_spec(ctx.dense))
    log = ctx.train(model, cfg, None, f"{name}: filter fine-tune")
    return [Variant(name, cfg.kind, model, structured=True,
                    details={"train": log.to_dict(), "channel_ratio": cfg.ratio})]


def hass_search(name: str, cfg: HassParams, ctx: Context) -> list[Variant]:
    layers = prunable(ctx.dense)
    macs = layer_macs(ctx.kind, ctx.dense, ctx.example)
    # Pipeline stages: the layers the deployed forward runs (a layer it never calls costs nothing).
    costs = {n: hass.LayerCost(weights=m.weight.numel(), macs=macs[n]) for n, m in layers.items() if macs[n] > 0}
    accelerator = hass.Dataflow(units=cfg.units, clock_mhz=cfg.clock_mhz)
    sens = ctx.sensitivity
    result = hass.search(costs, {n: sens.errors[n] for n in costs}, cfg.sparsity, sens.levels, accelerator,
                         cfg.slack, ctx.cfg.seed)
    uniform = dict.fromkeys(layers, cfg.sparsity)
    variants = []
    for label, allocation in ((name, {**uniform, **result.sparsity}), (f"{name}.uniform", uniform)):
        if label != name and not cfg.compare_uniform:
            continue
        model = copy.deepcopy(ctx.dense)
        masks = magnitude_masks(model, allocation, "layer")
        log = ctx.train(model, cfg, lambda masks=masks: masks, f"{label}: fine-tune")
        variants.append(Variant(label, cfg.kind, model, details={
            "train": log.to_dict(), "target_sparsity": cfg.sparsity, "achieved_sparsity": sparsity(masks),
            "per_layer_target": allocation}))
    variants[0].details["search"] = result.to_dict()
    return variants


METHODS: dict[str, Callable[[str, object, Context], list[Variant]]] = {
    "prune_finetune": prune_finetune, "mest": mest, "filter": filter_prune, "hass": hass_search}
