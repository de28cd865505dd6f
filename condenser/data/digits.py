"""The embedded default dataset: scikit-learn's bundled handwritten digits, rendered and captioned.

1,797 real 8x8 scans, upsampled, made RGB and rendered in stroke styles and colours, each captioned like
"a bold red handwritten seven". Nothing is downloaded: the scans ship inside scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from condenser.core.config import EMBEDDED_STYLES
from condenser.core.errors import DataError
from condenser.data.images import ImageSet, caption

# Keyed by condenser.core.config.EMBEDDED_COLORS (a test holds the two equal).
COLORS_RGB = {
    "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.25, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.1), "cyan": (0.1, 1.0, 1.0), "magenta": (1.0, 0.2, 1.0),
    "white": (1.0, 1.0, 1.0), "orange": (1.0, 0.55, 0.05),
}
STYLES = EMBEDDED_STYLES
# Strokes are drawn on a 32x32 canvas, then resized, so styles look alike at every resolution.
_CANVAS = 32


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
