"""Captioned image sets: the prepared splits every stage trains and is judged on.

A prepared split is stored as `<split>.safetensors` (uint8 images [N, 3, H, W], int64 labels, -1 where
unknown) plus `<split>.csv` (the captions and labels as text), so both tensors and people can read it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from condenser.core.errors import DataError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "validation", "test")


@dataclass
class ImageSet:
    """Images in [0, 255] uint8 [N, 3, H, W] with captions and labels (-1 where unknown)."""

    images: torch.Tensor
    captions: list[str]
    digit: torch.Tensor
    style: torch.Tensor
    color: torch.Tensor
    files: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(self.images[idx], [self.captions[i] for i in idx.tolist()], self.digit[idx],
                        self.style[idx], self.color[idx], [self.files[i] for i in idx.tolist()])

    def float_images(self) -> torch.Tensor:
        """Images in [0, 1] float32."""
        return self.images.float() / 255.0


def caption(digit: int, style: str, color: str) -> str:
    return f"a {style} {color} handwritten {DIGIT_WORDS[digit]}"


def split_indices(groups: np.ndarray, validation: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Split by group (source scan), so renderings of one scan never straddle two splits."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(unique)
    n_val, n_test = round(len(order) * validation), round(len(order) * test)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    return {name: np.flatnonzero(np.isin(groups, members)) for name, members in parts.items()}


def save_split(out_dir: Path, name: str, data: ImageSet) -> None:
    save_file({"images": data.images.contiguous(), "digit": data.digit, "style": data.style,
               "color": data.color}, str(Path(out_dir) / f"{name}.safetensors"))
    with open(Path(out_dir) / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "file", "caption", "digit", "style", "color"])
        for i, row in enumerate(zip(data.files, data.captions, data.digit.tolist(), data.style.tolist(),
                                    data.color.tolist())):
            writer.writerow([i, *row])


def load_split(prepared_dir: Path, name: str) -> ImageSet:
    prepared_dir = Path(prepared_dir)
    tensors_file, table_file = prepared_dir / f"{name}.safetensors", prepared_dir / f"{name}.csv"
    for p in (tensors_file, table_file):
        if not p.is_file():
            raise DataError(f"{p}: missing; run the prepare stage first (dvc repro -s prepare)")
    t = load_file(str(tensors_file))
    with open(table_file, newline="") as f:
        rows = list(csv.DictReader(f))
    return ImageSet(t["images"], [r["caption"] for r in rows], t["digit"], t["style"], t["color"],
                    [r["file"] for r in rows])
