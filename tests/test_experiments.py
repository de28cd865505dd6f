"""Remotes and experiments on real git + DVC repos: a local-folder DVC remote gives a fresh clone every output,
and a teammate's experiment, without running a stage; `dvc exp run -S` reruns only what the param touches; and
`condenser compare` puts the baseline and the experiment side by side per deliverable."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from contextlib import chdir
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params
from typer.testing import CliRunner

from bench.pipeline import dvc, scratch_project, stage_env
from condenser.cli import app
from condenser.core.config import parse_params
from condenser.core.io import md5_path, read_json
from condenser.lineage import flatten, read_lock

RAN = re.compile(r"Running stage '([^']+)'")


def sh(cmd: list[str], cwd: Path) -> str:
    """Run a command in a project (the stages on this interpreter, one thread each: 2 shared cores); its stdout
    and stderr together."""
    done = subprocess.run(cmd, cwd=cwd, env={**stage_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"`{' '.join(cmd)}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def dvc_status(root: Path, *stages: str) -> dict:
    """`dvc status --json` of `stages` and their upstream: {} when DVC finds them up to date."""
    done = subprocess.run([*dvc(), "status", "--json", "--with-deps", *stages], cwd=root, env=stage_env(),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def compare(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


@pytest.mark.slow
def test_a_clone_pulls_every_output_and_a_teammates_experiment_without_a_run(tmp_path: Path):
    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    project, origin, remote = tmp_path / "project", tmp_path / "origin.git", tmp_path / "remote"
    # dvc.yaml with only these two stages: `dvc exp apply` checks out every output dvc.yaml names.
    stages = ("prepare", "evaluator")
    scratch_project(project, params, stages=list(stages))
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    sh(["git", "remote", "add", "origin", str(origin)], project)
    sh([*dvc(), "remote", "add", "-d", "storage", str(remote)], project)
    sh([*dvc(), "repro"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "prepare and evaluator"], project)
    sh([*dvc(), "push", "--run-cache"], project)
    sh(["git", "push", "-q", "origin", "HEAD"], project)
    recorded = {s: read_lock(project)[s].outs for s in stages}
    made = {p: md5_path(project / p) for outs in recorded.values() for p in outs}

    # A teammate's experiment: only evaluator reruns; `exp push` sends its git ref and its cached outputs.
    ran = sh([*dvc(), "exp", "run", "-S", "evaluator.epochs=2", "-n", "two-epochs"], project)
    assert RAN.findall(ran) == ["evaluator"], ran
    sh([*dvc(), "exp", "push", "origin", "two-epochs"], project)
    two_epochs = read_lock(project)["evaluator"].outs  # exp run applied its results to the workspace
    two_epochs_made = md5_path(project / "data" / "evaluator")
    assert two_epochs != recorded["evaluator"]

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "data" / "prepare").exists()
    pulled = sh([*dvc(), "repro", "--pull"], clone)
    assert not RAN.findall(pulled), pulled
    assert "Pulling data for stage: 'evaluator'" in pulled
    # DVC finds every output as dvc.lock records it; each has the content the project made.
    assert dvc_status(clone, *stages) == {}
    assert {s: read_lock(clone)[s].outs for s in stages} == recorded
    assert {p: md5_path(clone / p) for p in made} == made

    # The teammate's experiment in the clone: pulled and applied, its outputs up to date without a run.
    sh(["git", "config", "user.email", "clone@condenser.local"], clone)
    sh(["git", "config", "user.name", "condenser clone"], clone)
    sh([*dvc(), "exp", "pull", "origin", "two-epochs"], clone)
    sh([*dvc(), "exp", "apply", "two-epochs"], clone)
    assert dvc_status(clone, *stages) == {}
    assert read_lock(clone)["evaluator"].outs == two_epochs
    assert md5_path(clone / "data" / "evaluator") == two_epochs_made

    # An experiment, but no stage that measures a deliverable ran: compare says so.
    shown = compare("--root", str(clone))
    assert shown.exit_code == 1 and "no deliverable figures" in shown.output and "validate" in shown.output


@pytest.fixture(scope="module")
def experiment(validated_root: Path, tmp_path_factory) -> tuple[Path, str]:
    """A git + DVC project holding validated_root's finished tiny run as DVC's up-to-date state, and one
    experiment on it: validate@cpu timed with fewer repeats. Returns the project and `dvc exp run`'s output."""
    from dvc.repo import Repo

    raw = yaml.safe_load((validated_root / "params.yaml").read_text())
    # What validated_root ran: lora for the one editor it compresses; dvc.yaml's predictor stage reads its params.
    raw["lora"]["concepts"] = ["bold"]
    raw["predictor"] = parse_params(raw).predictor.model_dump()
    root = scratch_project(tmp_path_factory.mktemp("experiments") / "project", raw)
    with chdir(root), Repo(str(root)) as repo:
        outs = {s.addressing: [o.def_path for o in s.outs] for s in repo.index.stages}
    validate = [s for s in outs if s.startswith("validate@")]
    for stage, paths in outs.items():
        if stage in ("predictor", "report"):
            continue  # never run for validated_root
        for rel in paths:
            src = validated_root / rel
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / rel)
    # The predictor's stand-in: validate loads data/predictor/model only for a target estimated by the predictor
    # (none here), as when validated_root ran without it.
    (root / "data" / "predictor").mkdir(parents=True)
    (root / "data" / "predictor" / "dataset.jsonl").write_text("")
    (root / "metrics" / "predictor.json").write_text("{}\n")
    (root / "plots" / "predictor.tsv").write_text("variant\tlatency_ms\n")
    # Upstream first (dvc.yaml's order): committing a stage writes its outputs' names into the .gitignore of their
    # folder (data/sparse/.gitignore), a file inside the folders validate depends on. `--with-deps` committed
    # validate@cpu before the last of those and left it changed.
    sh([*dvc(), "commit", "-f", *(s for s in outs if s != "report")], root)
    assert dvc_status(root, *validate) == {}
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "tiny run through validate"], root)
    ran = sh([*dvc(), "exp", "run", "validate@cpu", "-S", "targets.cpu.repeats=5", "-n", "fewer-repeats"], root)
    return root, ran


def _levels(rows: list[dict], name: str) -> dict[tuple, dict]:
    return {(r["level"], r["runtime"]): r for r in rows if r["experiment"] == name}


@pytest.mark.slow
def test_an_experiment_reruns_only_what_its_param_touches_and_compare_shows_it(experiment, validated_root: Path):
    root, ran = experiment
    assert RAN.findall(ran) == ["validate@cpu"], ran
    shown = compare("--root", str(root), "--json")
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.stdout)
    baseline = found["baseline"]
    assert [(e["name"], e["kind"], e["workspace"]) for e in found["experiments"]] == [
        (baseline, "baseline", False), ("fewer-repeats", "experiment", True)]
    assert found["params"] == {"targets.cpu.repeats": {baseline: 20, "fewer-repeats": 5}}
    assert [d["name"] for d in found["deliverables"]] == ["student", "editor_bold"]

    # The baseline is validated_root's run; the experiment's results are in the workspace (exp run applied them).
    measured = {name: {t: read_json(at / "metrics" / "validate" / f"{t}.json") for t in ("cpu", "mobile")}
                for name, at in ((baseline, validated_root), ("fewer-repeats", root))}
    assert measured["fewer-repeats"]["mobile"] == measured[baseline]["mobile"]  # validate@mobile did not rerun
    latencies = {}
    for d in found["deliverables"]:
        base, exp = _levels(d["rows"], baseline), _levels(d["rows"], "fewer-repeats")
        assert set(base) == set(exp) and ("dense", "onnxruntime") in base and ("int8", "onnxruntime") in base
        if d["name"] == "editor_bold":  # sparse.chain: filter50, deployed on both runtimes
            assert set(base) == {("dense", "onnxruntime"), ("sparse", "onnxruntime"), ("int8", "onnxruntime"),
                                 ("int8", "executorch")}
        for name, levels in ((baseline, base), ("fewer-repeats", exp)):
            for (level, runtime), row in levels.items():
                # Each figure is the one the most downstream stage measured: validate on the target that runs it.
                target = "cpu" if runtime == "onnxruntime" else "mobile"
                assert f"metrics/validate/{target}.json" in row["source"]
                v = measured[name][target]["deliverables"][d["name"]]["levels"][level]
                assert row["latency_per_call_ms"] == v["latency_ms"]["median"]
                assert row["size_bytes"] == v["size_bytes"]
                if level != "dense":  # dense quality: step_distill's / lora's evaluation, the chain's start
                    assert row["quality"] == flatten(v["quality"])
                latencies.setdefault(name, []).append(row["latency_per_call_ms"])
        # Fewer repeats times the same models: size and quality stay, latency is measured again.
        for key in base:
            assert exp[key]["size_bytes"] == base[key]["size_bytes"] and exp[key]["quality"] == base[key]["quality"]
    assert latencies[baseline] != latencies["fewer-repeats"]
    assert all(e["targets"]["cpu"]["status"] == "pass" for e in found["experiments"])

    table = compare("--root", str(root))
    assert table.exit_code == 0, table.output
    for text in ("targets.cpu.repeats", "fewer-repeats", baseline, "student", "editor_bold", "int8 w8a8",
                 "validate@cpu", "latency p50"):
        assert text in table.stdout, text


def test_compare_says_what_is_missing(tmp_path: Path):
    shown = compare("--root", str(tmp_path))
    assert shown.exit_code == 1 and "not a DVC project" in shown.output
    project = scratch_project(tmp_path / "project", tiny_params())
    shown = compare("--root", str(project))
    assert shown.exit_code == 1 and "no experiments" in shown.output and "dvc exp run" in shown.output
