"""The embedded dataset: rendering, captions, splits, and user folders with bad files."""

from pathlib import Path

import numpy as np
import pytest
import torch

from condenser.core.errors import DataError
from condenser.data.digits import embedded_digits, render
from condenser.data.folder import user_folder
from condenser.data.images import caption, load_split, save_split, split_indices
from tests.conftest import write_user_folder


def _ink(images: torch.Tensor) -> float:
    return float(images.float().mean())


def test_styles_change_the_strokes():
    from sklearn.datasets import load_digits

    gray = torch.tensor(load_digits().images[:50], dtype=torch.float32) / 16
    ink = {s: _ink(render(gray, [s] * 50, ["white"] * 50, 16)) for s in ("plain", "bold", "thin")}
    assert ink["bold"] > 1.3 * ink["plain"] > 1.3 * ink["thin"]
    plain, italic = render(gray, ["plain"] * 50, ["white"] * 50, 16), render(gray, ["italic"] * 50, ["white"] * 50, 16)
    assert (plain.float() - italic.float()).abs().mean() > 10


def test_colours_go_to_their_channels():
    from sklearn.datasets import load_digits

    gray = torch.tensor(load_digits().images[:4], dtype=torch.float32) / 16
    red = render(gray, ["plain"] * 4, ["red"] * 4, 16).float().mean((0, 2, 3))
    blue = render(gray, ["plain"] * 4, ["blue"] * 4, 16).float().mean((0, 2, 3))
    assert red[0] > 4 * red[2] and blue[2] > 2 * blue[0]


def test_embedded_digits_captions_and_labels():
    styles, colors = ["plain", "bold"], ["red", "green", "blue"]
    data, groups = embedded_digits(styles, colors, 16, variants=3, seed=1, max_images=40)
    assert data.images.shape == (120, 3, 16, 16) and data.images.dtype == torch.uint8
    assert len(np.unique(groups)) == 40
    for i in range(len(data)):
        expected = caption(int(data.digit[i]), styles[int(data.style[i])], colors[int(data.color[i])])
        assert data.captions[i] == expected
    assert data.captions[0].startswith("a ") and "handwritten" in data.captions[0]
    # Each scan's variants are distinct (style, colour) combinations.
    for g in range(3):
        idx = np.flatnonzero(groups == groups[g * 3])
        assert len({(int(data.style[i]), int(data.color[i])) for i in idx}) == 3


def test_seeded_rendering_is_deterministic():
    a, _ = embedded_digits(["plain", "bold"], ["red", "blue"], 16, 2, seed=3, max_images=30)
    b, _ = embedded_digits(["plain", "bold"], ["red", "blue"], 16, 2, seed=3, max_images=30)
    assert torch.equal(a.images, b.images) and a.captions == b.captions


def test_splits_are_disjoint_by_scan():
    groups = np.repeat(np.arange(100), 3)
    parts = split_indices(groups, 0.1, 0.2, seed=0)
    seen = [set(groups[idx]) for idx in parts.values()]
    assert seen[0].isdisjoint(seen[1]) and seen[0].isdisjoint(seen[2]) and seen[1].isdisjoint(seen[2])
    assert sum(len(i) for i in parts.values()) == 300
    assert len(parts["test"]) == 60 and len(parts["validation"]) == 30


def test_split_round_trip(tmp_path: Path):
    data, _ = embedded_digits(["plain"], ["red"], 16, 1, seed=0, max_images=20)
    save_split(tmp_path, "train", data)
    back = load_split(tmp_path, "train")
    assert torch.equal(back.images, data.images) and back.captions == data.captions
    assert torch.equal(back.digit, data.digit)


def test_user_folder_loads(tmp_path: Path):
    raw, data = user_folder(write_user_folder(tmp_path, 6), 16, ["plain"], ["red"])
    assert raw.shape == (6, 3, 16, 16) and data.digit.tolist() == list(range(6))


def test_corrupt_image_names_the_file(tmp_path: Path):
    folder = write_user_folder(tmp_path, 6)
    (folder / "img3.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"img3\.png: cannot be read as an image"):
        user_folder(folder, 16, ["plain"], ["red"])


def test_missing_captions_csv(tmp_path: Path):
    with pytest.raises(DataError, match="captions.csv: missing"):
        user_folder(tmp_path, 16, ["plain"], ["red"])


def test_unknown_label_names_line(tmp_path: Path):
    folder = write_user_folder(tmp_path, 6)
    text = (folder / "captions.csv").read_text().replace("img2.png,a plain red handwritten 2,2,plain,red",
                                                         "img2.png,a plain red handwritten 2,2,wavy,red")
    (folder / "captions.csv").write_text(text)
    with pytest.raises(DataError, match="line 4: style 'wavy'"):
        user_folder(folder, 16, ["plain"], ["red"])
