"""`condenser lineage` on a real git + DVC repo that ran prepare and evaluator with tiny params."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import yaml
from conftest import ROOT, tiny_params
from typer.testing import CliRunner

from bench.pipeline import dvc, scratch_project, stage_env
from condenser.cli import app
from condenser.lineage import LineageError, read_lock, render, trace


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    root = scratch_project(tmp_path_factory.mktemp("lineage") / "project", params)
    # One thread per stage: on 2 shared cores, more threads stall each other.
    subprocess.run([*dvc(), "repro", "evaluator"], cwd=root, env={**stage_env(), "OMP_NUM_THREADS": "1"},
                   check=True, capture_output=True)
    return root


def lock_md5s(root) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: {e["path"]: e["md5"] for e in s["deps"] + s["outs"]} for name, s in stages.items()}


@pytest.mark.slow
def test_lineage_walks_from_a_file_back_to_prepare(project):
    lineage = trace(project / "data" / "evaluator" / "judge.safetensors")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True).stdout.strip()
    lock = lock_md5s(project)

    assert lineage.output == "data/evaluator"
    assert [s.name for s in lineage.stages] == ["evaluator", "prepare"]
    assert lineage.upstream == {"evaluator": ["prepare"], "prepare": []}
    # The file's own md5, from DVC's listing of its folder, is the md5 of its bytes.
    assert lineage.md5 == hashlib.md5((project / "data/evaluator/judge.safetensors").read_bytes()).hexdigest()
    for stage in lineage.stages:
        assert {**stage.deps, **stage.outs} == lock[stage.name]
        assert stage.git_revision == head
    evaluator, prepare = lineage.stages
    assert evaluator.deps["data/prepare"] == prepare.outs["data/prepare"]
    assert evaluator.params["params.yaml"]["evaluator"]["epochs"] == 1
    assert prepare.params["params.yaml"]["prepare"]["max_images"] == tiny_params()["prepare"]["max_images"]
    code = "tasks/prepare.py"
    assert lineage.raw_inputs[code] == hashlib.md5((project / code).read_bytes()).hexdigest()
    assert "data/prepare" not in lineage.raw_inputs
    assert lineage.lock_commit is None  # dvc.lock was never committed in this repo

    text = render(lineage)
    assert text.index("stage evaluator") < text.index("stage prepare")
    assert prepare.outs["data/prepare"] in text and head in text


@pytest.mark.slow
def test_lineage_of_a_folder_and_of_a_metrics_file(project):
    lock = lock_md5s(project)
    folder = trace(project / "data" / "prepare")
    metrics = trace(project / "metrics" / "evaluator.json")
    assert (folder.md5, [s.name for s in folder.stages]) == (lock["prepare"]["data/prepare"], ["prepare"])
    assert (metrics.md5, metrics.stages[0].name) == (lock["evaluator"]["metrics/evaluator.json"], "evaluator")


@pytest.mark.slow
def test_a_path_no_stage_produced_is_an_error(project):
    with pytest.raises(LineageError, match="produced by no stage.*data/evaluator"):
        trace(project / "params.yaml")


def test_commit_comes_from_the_metrics_run_record_else_the_old_manifest(tmp_path):
    lock = {"stages": {
        "new": {"cmd": "x", "outs": [{"path": "data/new", "md5": "a.dir"},
                                     {"path": "metrics/new.json", "md5": "b"}]},
        "old": {"cmd": "y", "outs": [{"path": "data/old", "md5": "c.dir"},
                                     {"path": "metrics/old.json", "md5": "d"}]},
    }}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    for stage in ("new", "old"):
        (tmp_path / "data" / stage).mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "data/new/manifest.json").write_text(json.dumps({"stage": "new"}))
    (tmp_path / "metrics/new.json").write_text(json.dumps({"run": {"git_revision": "abc", "wall_time_s": 1}}))
    # Written before manifests lost the commit: no run record, the commit in the manifest.
    (tmp_path / "data/old/manifest.json").write_text(json.dumps({"git_revision": "def"}))
    (tmp_path / "metrics/old.json").write_text(json.dumps({"accuracy": 1.0}))
    records = read_lock(tmp_path)
    assert (records["new"].git_revision, records["old"].git_revision) == ("abc", "def")


def test_without_dvc_lock_says_run_the_pipeline_first(tmp_path):
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    with pytest.raises(LineageError, match="run the pipeline first"):
        trace(tmp_path / "data" / "prepare" / "train.csv")


@pytest.mark.slow
def test_cli_lineage_and_status(project):
    runner = CliRunner()
    shown = runner.invoke(app, ["lineage", str(project / "data/evaluator/judge.safetensors"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert [s["name"] for s in json.loads(shown.output)["stages"]] == ["evaluator", "prepare"]

    missing = runner.invoke(app, ["lineage", str(project / "params.yaml")])
    assert missing.exit_code == 1 and "produced by no stage" in missing.output

    status = runner.invoke(app, ["status", "--root", str(project)])
    assert status.exit_code == 0, status.output
    assert "up to date" in status.output and "test_accuracy" in status.output
