"""Config validation: a bad params.yaml is rejected before any work, naming the key."""

from pathlib import Path

import pytest

from condenser.config import ConfigError, load_params, parse_params
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
