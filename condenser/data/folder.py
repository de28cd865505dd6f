"""A user's own image folder: images (PNG, JPEG, BMP or .npy) plus `captions.csv`.

`captions.csv` has the columns file, caption and optionally digit, style, color (labels for the judge).
Raw pixel values are kept, NaN included, so validation can name a broken file instead of hiding it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from condenser.core.errors import DataError
from condenser.data.images import ImageSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".npy")


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
