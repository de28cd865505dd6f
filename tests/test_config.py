"""Config validation: a bad params.yaml is rejected before any work, naming the key."""

from pathlib import Path

import pytest

from condenser.core.config import EMBEDDED_COLORS, EMBEDDED_STYLES, ConfigError, Params, load_params, parse_params
from tests.conftest import ROOT, tiny_params, write_params


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.prepare.source == "digits"
    assert params.teacher.mode == "train"


def test_unknown_key_is_named():
    raw = tiny_params()
    raw["teacher"]["train"]["stepz"] = 5
    with pytest.raises(ConfigError, match=r"teacher\.train\.stepz: unknown key"):
        parse_params(raw)


def test_unknown_stage_is_named():
    with pytest.raises(ConfigError, match=r"teachr: unknown key"):
        parse_params({"teachr": {}})


def test_wrong_type_names_key_and_file(tmp_path: Path):
    raw = tiny_params()
    raw["evaluator"]["epochs"] = "many"
    path = write_params(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "evaluator.epochs" in str(err.value)


def test_inconsistent_teacher_mode():
    raw = tiny_params()
    raw["teacher"]["mode"] = "finetune"
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        parse_params(raw)


def test_folder_source_needs_folder():
    raw = tiny_params()
    raw["prepare"]["source"] = "folder"
    with pytest.raises(ConfigError, match="prepare.folder"):
        parse_params(raw)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_spells_out_the_defaults():
    """One source of each default: the config models. params.yaml writes the same values out (DVC reads
    the file itself), so the two must never disagree."""
    assert load_params(ROOT / "params.yaml") == Params()


def test_the_embedded_vocabulary_is_what_the_renderer_draws():
    from condenser.data.digits import COLORS_RGB, STYLES

    assert tuple(COLORS_RGB) == EMBEDDED_COLORS and STYLES == EMBEDDED_STYLES
    raw = tiny_params()
    raw["prepare"]["colors"] = ["red", "teal"]
    with pytest.raises(ConfigError, match="prepare.colors: teal cannot be rendered"):
        parse_params(raw)


@pytest.mark.parametrize("section, key, value, message", [
    ("teacher", "vae", {"channels": [8, 16, 32], "norm_num_groups": 8}, None),
    ("teacher", "unet", {"channels": [12, 32], "norm_num_groups": 8},
     r"teacher.unet.channels \[12\] are not multiples"),
    ("prepare", "resolution", 17, r"teacher.vae.channels: 2 blocks halve the image 1 times, which does not divide "
                                  r"prepare.resolution 17"),
    ("step_distill", "teacher_steps", 2048, r"step_distill.teacher_steps \(2048\) exceeds"),
])
def test_cross_section_rules_fail_at_load_time(section, key, value, message):
    raw = tiny_params()
    raw[section][key] = value
    if message is None:  # a fitting change passes
        parse_params(raw)
        return
    if section == "step_distill":
        raw["step_distill"]["student_steps"] = 2
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_a_deliverable_needs_the_stage_that_makes_it():
    raw = tiny_params()
    raw["deliverables"]["editor_thin"] = {"kind": "gan_editor", "path": "data/lora/thin/merged",
                                        "data": "data/distill_data/thin"}
    with pytest.raises(ConfigError, match=r"deliverables.editor_thin.path: .*'thin' is not in lora.concepts"):
        parse_params(raw)
    raw["deliverables"]["editor_thin"] = {"kind": "gan_unet", "path": "data/x", "data": "data/prepare"}
    with pytest.raises(ConfigError, match=r"deliverables.editor_thin.kind"):
        parse_params(raw)


def test_flow_retries_per_stage_group_and_default():
    from condenser.core.config import FlowParams

    flow = FlowParams(retries={"default": 1, "validate": 3, "validate@cuda": 0})
    assert [flow.retries_for(s) for s in ("teacher", "validate@cpu", "validate@cuda")] == [1, 3, 0]
    assert FlowParams(retries={}).retries_for("teacher") == 0
    with pytest.raises(ValueError, match="retries must be 0 or more"):
        FlowParams(retries={"teacher": -1})
