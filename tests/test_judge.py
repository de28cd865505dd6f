"""The judge and its metrics: FD behaves like a distance, accuracy is measured, weights round-trip."""

from pathlib import Path

import numpy as np
import torch

from condenser.data.images import load_split
from condenser.models.judge import HEADS, load_judge, predict
from condenser.quality import accuracy, fd, frechet_distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8)) + 1.0
    # Means 1 apart in each of 8 dimensions, equal covariances: FD = 8.
    assert abs(frechet_distance(a, b) - 8.0) < 0.5


def test_fd_grows_with_noise(prepared_root: Path):
    judge, _ = load_judge(prepared_root / "data" / "evaluator")
    test = load_split(prepared_root / "data" / "prepare", "test").float_images()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(test.shape, generator=gen)
    distances = [fd(judge, test, (test + s * noise).clamp(0, 1)) for s in (0.0, 0.05, 0.2, 0.5)]
    assert distances[0] < 1e-6
    assert distances == sorted(distances) and distances[-1] > 3 * distances[1]


def test_judge_learns_and_round_trips(prepared_root: Path):
    judge, meta = load_judge(prepared_root / "data" / "evaluator")
    assert meta["colors"] == ["red", "green", "blue"]
    test = load_split(prepared_root / "data" / "prepare", "test")
    labels = {h: getattr(test, h) for h in HEADS}
    acc = accuracy(judge, test.float_images(), labels)
    # A tiny judge trained on 280 images: well above chance (10% digits, 33% colours).
    assert acc["digit"] > 0.3 and acc["color"] > 0.9
    again, _ = load_judge(prepared_root / "data" / "evaluator")
    x = test.float_images()[:32]
    assert all(torch.equal(a, b) for a, b in zip(predict(judge, x).values(), predict(again, x).values()))


def test_unknown_labels_are_skipped(prepared_root: Path):
    judge, _ = load_judge(prepared_root / "data" / "evaluator")
    test = load_split(prepared_root / "data" / "prepare", "test")
    unknown = torch.full_like(test.digit, -1)
    acc = accuracy(judge, test.float_images(), {"digit": test.digit, "style": unknown, "color": unknown})
    assert set(acc) == {"digit"}


def test_judge_quality_floor_on_all_digits(tmp_path: Path):
    """The judge the metrics rely on: on every bundled scan (one rendering each), digits >= 90%."""
    from condenser.core.config import parse_params
    from condenser.core.io import StagePaths
    from tasks import evaluator, prepare
    from tests.conftest import tiny_params

    raw = tiny_params()
    raw["prepare"].update(max_images=None, variants_per_image=1)
    raw["evaluator"].update(epochs=20, batch_size=32, lr=0.003, width=16, feature_dim=32)
    params = parse_params(raw)
    prepare.run(params.prepare, StagePaths(tmp_path))
    metrics = evaluator.run(params.evaluator, StagePaths(tmp_path))
    assert metrics["test_accuracy"]["digit"] >= 0.9
    assert metrics["test_accuracy"]["color"] >= 0.97
