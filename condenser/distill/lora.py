"""lora: a per-concept LoRA on the base GAN's crucial layers, with rank search and a data study.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (E2GAN, arXiv
2401.06127): instead of a new GAN per concept, fine-tune the base GAN with peft LoRA on its crucial
layers only. `search` runs the method's steps:
1. Crucial layers, measured: a short full fine-tune (`probe_steps`) on the concept's pairs; the
   `crucial_layers` layers whose weights moved most (relative Frobenius change) get the LoRA.
2. Rank search over `ranks` on all the concept's training pairs; keep the smallest rank whose validation
   PSNR (against the teacher's edits) is within `tolerance_db` of the best.
3. Data study at that rank over `data_fractions` (nested subsets); keep the least data within
   `tolerance_db` of the largest fraction, as the paper keeps the least data that holds quality.
4. Full fine-tuning of the base on the same data and steps, for comparison: size, time, quality.
A concept outside the base's concepts gets a new concept code, initialised at the mean of the base codes
and trained along with the LoRA (it counts in the adapter's size).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from condenser.core.config import LoraParams
from condenser.data.pairs import EditPairs, data_fraction
from condenser.models.common import parameter_count
from condenser.models.editor import Discriminator, Generator
from condenser.train.gan import GanObjective, GanTrainResult, train_gan


def adaptable_layers(generator: Generator) -> list[str]:
    """Names of the generator's layers LoRA can wrap: every conv and the FiLM linears."""
    return [name for name, m in generator.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_change(before: nn.Module, after: nn.Module) -> list[dict]:
    """Per adaptable layer, how far a fine-tune moved its weight: ||W_after - W_before|| / ||W_before||,
    largest first. The layers that move most are the ones the new concept needs (the crucial layers)."""
    old = dict(before.named_modules())
    rows = []
    for name in adaptable_layers(before):
        w0, w1 = old[name].weight.detach(), dict(after.named_modules())[name].weight.detach()
        bias = old[name].bias
        rows.append({"layer": name, "relative_change": float((w1 - w0).norm() / w0.norm().clamp_min(1e-12)),
                     "params": old[name].weight.numel() + (bias.numel() if bias is not None else 0)})
    return sorted(rows, key=lambda r: -r["relative_change"])


def with_lora(generator: Generator, layers: list[str], rank: int, train_codes: bool):
    """A peft LoRA model of a copy of `generator`, on `layers` only; `train_codes` also trains the concept
    code table (a new concept's code must be learned)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(layers),
                        modules_to_save=["codes"] if train_codes else None, init_lora_weights=True)
    return get_peft_model(copy.deepcopy(generator), config)


def merged(peft_model, concept: str) -> Generator:
    """The LoRA folded into the weights (`merge_and_unload`): a plain Generator whose default concept is
    `concept`, ready for export."""
    generator = copy.deepcopy(peft_model).merge_and_unload()
    generator.config = replace(generator.config, default=concept)
    return generator.eval()


def adapter_parameters(peft_model) -> int:
    """The adapter's size: the parameters that train (LoRA matrices, and a new concept's code table)."""
    return parameter_count(peft_model, trainable=True)


@dataclass
class SearchResult:
    crucial: list[str]
    layer_changes: list[dict]
    rank_rows: list[dict]
    rank: int
    data_rows: list[dict]
    fraction: float
    subset: np.ndarray
    chosen_row: dict
    chosen: nn.Module  # the peft model of the chosen (rank, fraction)
    full_finetune: Generator
    full_result: GanTrainResult


def search(base: Generator, base_disc: Discriminator, pairs: EditPairs, train_idx: np.ndarray, val: EditPairs,
           concept: str, cfg: LoraParams, objective: GanObjective, accelerator,
           score: Callable[[nn.Module, EditPairs], dict]) -> SearchResult:
    """Steps 1-4 of the method on `base` (which already knows `concept`); `score(generator, pairs)` gives
    the quality of a generator's edits of `pairs` (PSNR first: ranks and fractions are chosen on it)."""
    names = base.config.concepts
    new_concept = concept not in objective.concepts

    def fit(generator, data, lr, steps, desc):
        return train_gan(generator, copy.deepcopy(base_disc), data, names, steps, cfg.batch_size, lr, cfg.disc_lr,
                         objective.l1_weight, objective.adv_weight, cfg.seed, accelerator, desc=desc)

    # 1. Crucial layers: where a short full fine-tune moves the weights most.
    probe = copy.deepcopy(base).requires_grad_(True)
    fit(probe, pairs.subset(train_idx), cfg.full_lr, cfg.probe_steps, f"lora@{concept}: probe")
    changes = layer_change(base, probe)
    crucial = [row["layer"] for row in changes[:cfg.crucial_layers]]

    # 2. Rank search on all training pairs.
    def lora_trial(rank: int, fraction: float, subset: np.ndarray) -> tuple[dict, nn.Module]:
        # LoRA's A matrices start random: seeded per trial, so each trial is the same whatever ran before
        # (torch's default generator starts from a random seed in every process).
        torch.manual_seed(cfg.seed)
        model = with_lora(base, crucial, rank, train_codes=new_concept)
        result = fit(model, pairs.subset(subset), cfg.lr, cfg.steps, f"lora@{concept}: rank {rank}, {fraction:.0%}")
        adapter = adapter_parameters(model)
        row = {"rank": rank, "data_fraction": fraction, "train_pairs": len(subset), "adapter_parameters": adapter,
               "adapter_share": adapter / parameter_count(base), "train_wall_time_s": result.wall_time_s,
               **{f"val_{k}": v for k, v in score(model, val).items()}}
        return row, model

    full = max(cfg.data_fractions)
    full_subset = data_fraction(train_idx, full, cfg.seed)
    trials = {(r, full): lora_trial(r, full, full_subset) for r in sorted(cfg.ranks)}
    rank_rows = [trials[(r, full)][0] for r in sorted(cfg.ranks)]
    best = max(row["val_psnr"] for row in rank_rows)
    rank = min(row["rank"] for row in rank_rows if row["val_psnr"] >= best - cfg.tolerance_db)

    # 3. Data study at the chosen rank.
    for f in sorted(cfg.data_fractions):
        if (rank, f) not in trials:
            trials[(rank, f)] = lora_trial(rank, f, data_fraction(train_idx, f, cfg.seed))
    data_rows = [trials[(rank, f)][0] for f in sorted(cfg.data_fractions)]
    reference = trials[(rank, full)][0]["val_psnr"]
    fraction = min(row["data_fraction"] for row in data_rows if row["val_psnr"] >= reference - cfg.tolerance_db)
    chosen_row, chosen = trials[(rank, fraction)]
    subset = data_fraction(train_idx, fraction, cfg.seed)

    # 4. Full fine-tuning on the same data, for comparison.
    full_ft = copy.deepcopy(base).requires_grad_(True)
    full_result = fit(full_ft, pairs.subset(subset), cfg.full_lr, cfg.steps, f"lora@{concept}: full fine-tune")
    full_ft.eval()
    return SearchResult(crucial, changes, rank_rows, rank, data_rows, fraction, subset, chosen_row, chosen,
                        full_ft, full_result)
