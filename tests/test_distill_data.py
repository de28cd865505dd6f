"""distill_data: the teacher's img2img pairs, validated by Great Expectations before they are written."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condenser.core.config import ConfigError, parse_params
from condenser.core.errors import DataError
from condenser.core.io import StagePaths
from condenser.data.images import load_split
from condenser.distill.distill_data import make_pairs
from condenser.models.teacher import load_img2img
from tasks import distill_data
from tests.conftest import tiny_params


def _cfg(**checks):
    # TINY_PARAMS's floors are 0: a tiny teacher edits badly, and the judge-based floors are the
    # default run's business, not this test's.
    raw = tiny_params()
    raw["distill_data"]["checks"].update(checks)
    return parse_params(raw).distill_data


def _bold_pairs(root: Path, split: str, seed_offset: int = 0, n: int | None = None):
    cfg = _cfg()
    meta = json.loads((root / "data" / "prepare" / "meta.json").read_text())
    pipe = load_img2img(root / "data" / "teacher")
    return make_pairs(pipe, load_split(root / "data" / "prepare", split), cfg.concepts["bold"], "bold",
                      meta["styles"], meta["colors"], cfg.steps, cfg.guidance_scale, cfg.batch_size,
                      cfg.seed + seed_offset, n=n)


@pytest.fixture(scope="module")
def pairs(teacher_root: Path):
    return _bold_pairs(teacher_root, "train")


@pytest.fixture(scope="module")
def heldout(teacher_root: Path):
    # As the stage makes them: test-split sources, the next seed.
    return _bold_pairs(teacher_root, "test", 1, n=_cfg().concepts["bold"].heldout)


def test_stage_writes_validated_pairs(teacher_root: Path, pairs, heldout):
    metrics = distill_data.write_pairs(_cfg(), StagePaths(teacher_root), "bold", pairs, heldout)
    out = teacher_root / "data" / "distill_data" / "bold"
    tensors = load_file(str(out / "pairs.safetensors"))
    assert tensors["sources"].shape == tensors["edits"].shape == (12, 3, 16, 16)
    held = load_file(str(out / "heldout.safetensors"))
    assert held["sources"].shape == (8, 3, 16, 16) and (out / "heldout.csv").is_file()
    # Held-out sources come from the test split: none is a training source.
    assert not set(heldout.source_files) & set(pairs.source_files)
    assert tensors["sources"].dtype == torch.uint8
    # The concept sets the style; the source's colour is kept in the prompt.
    assert (tensors["target_style"] == 1).all() and torch.equal(tensors["target_color"], tensors["source_color"])
    rows = (out / "pairs.csv").read_text().splitlines()
    assert len(rows) == 13 and "a bold" in rows[1]
    assert json.loads((out / "expectations.json").read_text())["success"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"data/prepare", "data/teacher", "data/evaluator"} <= set(manifest["inputs"])
    assert manifest["params"]["concept"] == "bold"
    saved = json.loads((teacher_root / "metrics" / "distill_data" / "bold.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["mean_abs_diff"] > 0.02
    assert 0 <= saved["concept_accuracy"] <= 1 and saved["seconds_per_pair"] > 0
    assert (teacher_root / "plots" / "distill_data" / "bold.png").is_file()


def test_pairs_are_seeded(teacher_root: Path, pairs):
    again = _bold_pairs(teacher_root, "train")
    assert torch.allclose(again.edits, pairs.edits, atol=1e-5) and again.prompts == pairs.prompts


def _fails(teacher_root: Path, pairs, heldout, expectation: str, row: str, concept: str = "recolor_blue"):
    with pytest.raises(DataError) as err:
        distill_data.write_pairs(_cfg(), StagePaths(teacher_root), concept, pairs, heldout)
    assert expectation in str(err.value) and row in str(err.value)
    assert not (teacher_root / "data" / "distill_data" / concept).exists()


def test_nan_edit_fails_the_suite(teacher_root: Path, pairs, heldout):
    edits = pairs.edits.clone()
    edits[2, 0, 3, 3] = float("nan")
    _fails(teacher_root, replace(pairs, edits=edits), heldout, "nonfinite_count", "pair 2 ")


def test_unchanged_edit_fails_the_suite(teacher_root: Path, pairs, heldout):
    edits = heldout.edits.clone()
    edits[5] = heldout.sources[5]
    _fails(teacher_root, pairs, replace(heldout, edits=edits), "mean_abs_diff", "heldout 5 ")


def test_concept_floor_fails_the_suite(teacher_root: Path, pairs, heldout):
    with pytest.raises(DataError, match="expect_column_mean_to_be_between.*concept_shown"):
        distill_data.write_pairs(_cfg(min_concept_accuracy=1.0), StagePaths(teacher_root), "bold",
                                 replace(pairs, edits=pairs.sources.clone() * 0.5), heldout)


def test_unknown_concept_target_is_named_when_params_load():
    raw = tiny_params()
    raw["distill_data"]["concepts"]["wavy"] = {"style": "wavy"}
    with pytest.raises(ConfigError, match=r"distill_data.concepts.wavy.style: 'wavy' is not one of prepare.styles"):
        parse_params(raw)


def test_concept_must_edit_one_attribute():
    raw = tiny_params()
    raw["distill_data"]["concepts"]["both"] = {"style": "bold", "color": "blue"}
    with pytest.raises(Exception, match="exactly one of 'style' or 'color'"):
        parse_params(raw)
