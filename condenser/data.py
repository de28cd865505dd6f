"""The embedded default dataset and user image folders.

Embedded default: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans), upsampled, made
RGB and rendered in stroke styles and colours, each captioned like "a bold red handwritten seven".
A user folder holds images plus `captions.csv` (columns: file, caption, and optionally digit, style,
color labels for the judge).

A prepared split is stored as `<split>.safetensors` (uint8 images [N, 3, H, W], int64 labels, -1 where
unknown) plus `<split>.csv` (the captions and labels as text), so both tensors and people can read it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS_RGB = {
    "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.25, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.1), "cyan": (0.1, 1.0, 1.0), "magenta": (1.0, 0.2, 1.0),
    "white": (1.0, 1.0, 1.0), "orange": (1.0, 0.55, 0.05),
}
STYLES = ("plain", "bold", "thin", "italic")
SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".npy")
# Strokes are drawn on a 32x32 canvas, then resized, so styles look alike at every resolution.
_CANVAS = 32


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what to fix."""


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


def _strokes(gray8: torch.Tensor, style: str) -> torch.Tensor:
    """Render 8x8 intensities [N, 8, 8] in [0, 1] as strokes on the canvas [N, 1, C, C]."""
    x = F.interpolate(gray8[:, None], size=(_CANVAS, _CANVAS), mode="bicubic", align_corners=False)
    x = x.clamp(0, 1)
    if style == "bold":
        x = F.max_pool2d(x, 5, stride=1, padding=2)
    elif style == "thin":
        x = -F.max_pool2d(-x, 3, stride=1, padding=1)
        x = (x * 1.6).clamp(0, 1)
    elif style == "italic":
        shear = torch.tensor([[1.0, 0.45, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(shear, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif style != "plain":
        raise DataError(f"unknown style '{style}' in prepare.styles; choose from {', '.join(STYLES)}")
    return x


def render(gray8: torch.Tensor, styles: list[str], colors: list[str], resolution: int) -> torch.Tensor:
    """Render [N, 8, 8] digits, each in its own style and colour, as uint8 [N, 3, R, R]."""
    out = torch.empty(len(gray8), 3, resolution, resolution)
    for style in set(styles):
        sel = torch.tensor([s == style for s in styles])
        strokes = _strokes(gray8[sel], style)
        out[sel] = F.interpolate(strokes, size=(resolution, resolution), mode="area").expand(-1, 3, -1, -1)
    rgb = torch.tensor([COLORS_RGB[c] for c in colors])[:, :, None, None]
    return (out * rgb * 255).round().clamp(0, 255).to(torch.uint8)


def embedded_digits(styles: list[str], colors: list[str], resolution: int, variants: int, seed: int,
                    max_images: int | None = None) -> tuple[ImageSet, np.ndarray]:
    """Render the bundled digits; returns the set and each image's source-scan index (for splits)."""
    from sklearn.datasets import load_digits

    for c in colors:
        if c not in COLORS_RGB:
            raise DataError(f"unknown colour '{c}' in prepare.colors; choose from {', '.join(COLORS_RGB)}")
    digits = load_digits()
    gray = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = np.asarray(digits.target)
    rng = np.random.default_rng(seed)
    if max_images is not None and max_images < len(gray):
        keep = np.sort(rng.permutation(len(gray))[:max_images])
        gray, labels = gray[keep], labels[keep]
    # Every source scan appears in `variants` different (style, colour) combinations.
    combos = [(s, c) for s in range(len(styles)) for c in range(len(colors))]
    source, style_idx, color_idx = [], [], []
    for i in range(len(gray)):
        for k in rng.permutation(len(combos))[:variants]:
            source.append(i)
            style_idx.append(combos[k][0])
            color_idx.append(combos[k][1])
    source = np.asarray(source)
    images = render(gray[source], [styles[s] for s in style_idx], [colors[c] for c in color_idx],
                    resolution)
    digit = torch.as_tensor(labels[source], dtype=torch.long)
    caps = [caption(int(d), styles[s], colors[c]) for d, s, c in zip(digit, style_idx, color_idx)]
    files = [f"sklearn-digits[{int(digits_i)}]" for digits_i in source]
    return ImageSet(images, caps, digit, torch.tensor(style_idx), torch.tensor(color_idx), files), source


def split_indices(groups: np.ndarray, validation: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Split by group (source scan), so renderings of one scan never straddle two splits."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(unique)
    n_val, n_test = round(len(order) * validation), round(len(order) * test)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    return {name: np.flatnonzero(np.isin(groups, members)) for name, members in parts.items()}


def _load_image(path: Path, resolution: int) -> np.ndarray:
    """One user image as float32 [3, R, R] in [0, 255]; NaN survives so validation can name it."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            if arr.ndim == 2:
                arr = np.repeat(arr[None], 3, axis=0)
            elif arr.ndim == 3 and arr.shape[-1] in (1, 3):
                arr = np.moveaxis(arr, -1, 0)
            if arr.ndim != 3 or arr.shape[0] not in (1, 3):
                raise DataError(f"{path}: expected an array [H, W], [H, W, 3] or [3, H, W], got {arr.shape}")
            if arr.shape[0] == 1:
                arr = np.repeat(arr, 3, axis=0)
            if np.isfinite(arr).all() and arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            t = torch.from_numpy(np.ascontiguousarray(arr))[None]
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for a broken file; all mean the same to a user
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}); "
                        "replace or remove the file and its row in captions.csv") from None
    if t.shape[-2:] != (resolution, resolution):
        t = F.interpolate(t, size=(resolution, resolution), mode="area")
    return t[0].numpy()


def user_folder(folder: Path, resolution: int, styles: list[str], colors: list[str]
                ) -> tuple[np.ndarray, ImageSet]:
    """Read a user folder: returns raw float images (NaN kept, for validation) and the set."""
    folder = Path(folder)
    table = folder / "captions.csv"
    if not folder.is_dir():
        raise DataError(f"prepare.folder: {folder} is not a directory; point it at a folder of images "
                        "with a captions.csv")
    if not table.is_file():
        raise DataError(f"{table}: missing; add a CSV with columns 'file,caption' (optionally digit, "
                        "style, color) listing each image")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "caption"} <= set(rows[0]):
        raise DataError(f"{table}: needs a header with at least the columns 'file' and 'caption'")

    def label(row: dict, key: str, vocab: list[str] | None, line: int) -> int:
        value = (row.get(key) or "").strip()
        if not value:
            return -1
        if vocab is None:
            if not value.isdigit() or not 0 <= int(value) <= 9:
                raise DataError(f"{table}: line {line}: digit '{value}' is not 0-9")
            return int(value)
        if value not in vocab:
            raise DataError(f"{table}: line {line}: {key} '{value}' is not one of prepare.{key}s "
                            f"({', '.join(vocab)}); add it there or fix the row")
        return vocab.index(value)

    raw, caps, files, dig, sty, col = [], [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        path = folder / row["file"]
        if not path.is_file():
            raise DataError(f"{table}: line {line}: image file {path} does not exist")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: unsupported image type; use one of {', '.join(IMAGE_SUFFIXES)}")
        raw.append(_load_image(path, resolution))
        caps.append(row["caption"] or "")
        files.append(str(path))
        dig.append(label(row, "digit", None, line))
        sty.append(label(row, "style", styles, line))
        col.append(label(row, "color", colors, line))
    images = np.stack(raw)
    clean = torch.from_numpy(np.nan_to_num(images)).round().clamp(0, 255).to(torch.uint8)
    return images, ImageSet(clean, caps, torch.tensor(dig), torch.tensor(sty), torch.tensor(col), files)


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
