"""Editing pairs: (source, teacher edit) images per concept, as distill_data makes and stores them.

`Pairs` is what distill_data generates (images in [0, 1], with prompts, seeds and labels); `save_pairs`
stores a set as `<name>.safetensors` + `<name>.csv` (`pairs` from the train split, `heldout` from the
test split), and `concept.json` says how the concept was made (which attribute it edits, the teacher's
img2img settings). `EditPairs` is what the GAN trains on (images in [-1, 1]); `load_pairs` and
`read_concept` are the only readers of a distill_data folder.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

CONCEPT_FILE = "concept.json"


@dataclass
class Pairs:
    """Sources and edits in [0, 1] float [N, 3, H, W] (edits not yet clamped, so NaN/inf can be seen)."""

    sources: torch.Tensor
    edits: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    source_files: list[str]
    digit: torch.Tensor
    source_style: torch.Tensor
    source_color: torch.Tensor
    target_style: torch.Tensor
    target_color: torch.Tensor
    seconds_per_pair: float = 0.0


@dataclass(frozen=True)
class ConceptSpec:
    """How a concept's pairs were made: the attribute it edits (the judge head, `style` or `color`), and
    the teacher's img2img settings the GAN is compared and timed against."""

    name: str
    head: str
    prompt: str
    strength: float
    steps: int
    guidance_scale: float


def write_concept(folder: Path, spec: ConceptSpec) -> None:
    (Path(folder) / CONCEPT_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")


def read_concept(concept_dir: Path) -> ConceptSpec:
    path = Path(concept_dir) / CONCEPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run distill_data for this concept first "
                                f"(dvc repro distill_data@{Path(concept_dir).name})")
    return ConceptSpec(**json.loads(path.read_text()))


def save_pairs(folder: Path, name: str, pairs: Pairs, table: pd.DataFrame, styles: list[str],
               colors: list[str]) -> None:
    """`<name>.safetensors` (uint8 images, int64 labels) and `<name>.csv` (one readable row per pair)."""
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()  # noqa: E731
    save_file({"sources": to_uint8(pairs.sources), "edits": to_uint8(pairs.edits), "digit": pairs.digit,
               "source_style": pairs.source_style, "source_color": pairs.source_color,
               "target_style": pairs.target_style, "target_color": pairs.target_color},
              str(Path(folder) / f"{name}.safetensors"))
    with open(Path(folder) / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "source_file", "prompt", "seed", "digit", "source_style", "source_color",
                         "target_style", "target_color", "mean_abs_diff", "digit_preserved", "concept_shown"])
        for i, row in table.iterrows():
            writer.writerow([i, pairs.source_files[i], pairs.prompts[i], pairs.seeds[i], int(pairs.digit[i]),
                             styles[int(pairs.source_style[i])], colors[int(pairs.source_color[i])],
                             styles[int(pairs.target_style[i])], colors[int(pairs.target_color[i])],
                             round(row["mean_abs_diff"], 6), int(row["digit_preserved"]), int(row["concept_shown"])])


@dataclass
class EditPairs:
    """Sources and teacher edits in [-1, 1] [N, 3, H, W], each with its concept's name."""

    sources: torch.Tensor
    edits: torch.Tensor
    concepts: list[str]
    digit: torch.Tensor
    target_style: torch.Tensor
    target_color: torch.Tensor

    def __len__(self) -> int:
        return len(self.concepts)

    def subset(self, index) -> EditPairs:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return EditPairs(self.sources[idx], self.edits[idx], [self.concepts[i] for i in idx.tolist()],
                         self.digit[idx], self.target_style[idx], self.target_color[idx])

    @staticmethod
    def cat(parts: list[EditPairs]) -> EditPairs:
        return EditPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in ("sources", "edits")),
                         [c for p in parts for c in p.concepts],
                         *(torch.cat([getattr(p, f) for p in parts]) for f in ("digit", "target_style",
                                                                                "target_color")))


def load_pairs(concept_dir: Path, concept: str, file: str = "pairs.safetensors") -> EditPairs:
    """One concept's pairs as distill_data wrote them (`pairs.safetensors` or `heldout.safetensors`)."""
    path = Path(concept_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run distill_data for concept '{concept}' first "
                                f"(dvc repro distill_data@{concept})")
    t = load_file(str(path))
    to_signed = lambda x: x.float() / 127.5 - 1  # noqa: E731
    return EditPairs(to_signed(t["sources"]), to_signed(t["edits"]), [concept] * len(t["sources"]), t["digit"],
                     t["target_style"], t["target_color"])


def split_pairs(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a concept's pairs. gan_base and lora split alike, so the pairs lora
    selects ranks on were never seen by the base either."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * validation_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def data_fraction(train_idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first `fraction` of a seeded order: smaller fractions are subsets of larger ones."""
    order = np.random.default_rng(seed + 1).permutation(train_idx)
    return np.sort(order[:max(2, math.ceil(len(order) * fraction))])
