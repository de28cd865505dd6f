"""The Prefect flow on a real git + DVC repo under a real (temporary) Prefect server.

One server for the whole story, since starting it costs far more than a tiny flow run: a cold run
executes every stage up to lora@italic and step_distill and publishes lineage (and `condenser lineage`
walks the merged editor back to prepare); a rerun executes none; a changed evaluator param reruns the
evaluator and everything downstream, not prepare; a bad prepare param fails the flow with the stage's
own error, and nothing downstream runs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import ROOT, tiny_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from bench.pipeline import dvc, scratch_project, stage_env
from condenser.cli import app
from flows.pipeline import asset_key, condenser_pipeline

MATERIALIZED = "prefect.asset.materialization.succeeded"


def flow_run_filter(flow_run_id) -> dict:
    return {"flow_run_filter": FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))}


async def artifacts_of(flow_run_id) -> dict:
    async with get_client() as client:
        # This client sends unset filters, limit and sort as null, which the server rejects.
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(), task_run_filter=TaskRunFilter(),
                                            limit=50, sort=ArtifactSort.KEY_ASC,
                                            **flow_run_filter(flow_run_id))
    return {a.key: a.data for a in found}


async def task_states(flow_run_id) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(limit=50, sort=TaskRunSort.NAME_ASC,
                                           **flow_run_filter(flow_run_id))
    # Prefect names a task run after its task plus a short suffix: "evaluator-4f2".
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def materializations(expected: int, timeout_s: float = 30) -> list:
    """Asset materialization events, once the server has stored `expected` of them (it batches writes)."""
    EventsWorker.drain_all()

    async def poll():
        deadline = time.monotonic() + timeout_s
        async with get_client() as client:
            while True:
                page = await client.read_events(EventFilter(event=EventNameFilter(name=[MATERIALIZED])),
                                                limit=50)
                if len(page.events) >= expected or time.monotonic() > deadline:
                    return page.events
                await asyncio.sleep(1)

    return asyncio.run(poll())


def run_flow(root, targets):
    state = condenser_pipeline(root=str(root), targets=targets, return_state=True)
    return state, state.state_details.flow_run_id


def set_param(root, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc_status(root, *targets) -> str:
    return subprocess.run([*dvc(), "status", *targets], cwd=root, env=stage_env(), capture_output=True,
                          text=True, check=True).stdout


def lock_md5(root, stage: str, out: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return next(o["md5"] for o in lock[stage]["outs"] if o["path"] == out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_runs_dvc_stages_and_publishes_lineage(tmp_path, monkeypatch):
    # One thread per stage: on 2 shared cores, more threads stall each other.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Offline, the server's telemetry only fails, and holds its database lock while doing so.
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    root = scratch_project(tmp_path / "project", params)
    # Every stage kind: plain stages, foreach items (distill_data@*, lora@italic) and fan-in (gan_base).
    targets = ["lora@italic", "step_distill"]
    concepts = [f"distill_data@{c}" for c in params["distill_data"]["concepts"]]
    downstream = ["teacher", *concepts, "gan_base", "lora@italic", "step_distill"]
    stages = ["prepare", "evaluator", *downstream]

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}), \
            prefect_test_harness(server_startup_timeout=180):
        # 1. Cold: every stage executes, upstream first.
        state, first_run = run_flow(root, targets)
        assert state.is_completed(), state.message
        summary = state.result()
        assert [s["stage"] for s in summary["stages"]][:3] == ["prepare", "evaluator", "teacher"]
        assert {s["stage"]: s["status"] for s in summary["stages"]} == dict.fromkeys(stages, "executed")
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        for stage in summary["stages"]:
            assert stage["outputs"] == {o["path"]: o["md5"] for o in lock[stage["stage"]]["outs"]}
            assert all((root / p).exists() for p in stage["outputs"])
        assert "Data and pipelines are up to date" in dvc_status(root, *targets)
        evaluator = summary["stages"][1]
        assert set(evaluator["metrics"]) >= {"test_accuracy.digit", "fd_validation_vs_test"}

        artifacts = asyncio.run(artifacts_of(first_run))
        slugs = [s.replace("_", "-").replace("@", "-") for s in stages]
        assert set(artifacts) == {f"{slug}-{kind}" for slug in slugs for kind in ("lineage", "metrics")} | {
            "prepare-expectations", *(f"{slug}-expectations" for slug in slugs if slug.startswith("distill-data"))}
        lineage_rows = json.loads(artifacts["evaluator-lineage"])
        judge_row = next(r for r in lineage_rows if r["artifact"] == "data/evaluator")
        assert judge_row["md5"] == evaluator["outputs"]["data/evaluator"]
        assert f"data/prepare {summary['stages'][0]['outputs']['data/prepare']}" in judge_row["inputs"]
        assert judge_row["commit"] == evaluator["git_revision"]
        assert "expect_column_values_to_be_in_set" in artifacts["prepare-expectations"]
        assert "mean_abs_diff" in artifacts["distill-data-bold-expectations"]
        # `condenser lineage` on the merged editor walks back through every stage that made it.
        shown = CliRunner().invoke(app, ["lineage", str(root / "data/lora/italic/merged/generator.safetensors"),
                                         "--json"])
        assert shown.exit_code == 0, shown.output
        lineage = json.loads(shown.output)
        assert lineage["output"] == "data/lora/italic" and lineage["stages"][0]["name"] == "lora@italic"
        up = {s["name"]: set(s["upstream"]) for s in lineage["stages"]}
        assert set(up) == {"lora@italic", "gan_base", "teacher", "evaluator", "prepare", *concepts}
        assert {"gan_base", "distill_data@italic", "teacher"} <= up["lora@italic"]
        # lora -> gan_base -> distill_data -> teacher -> prepare; the base GAN never saw italic.
        assert "distill_data@italic" not in up["gan_base"] and "distill_data@bold" in up["gan_base"]
        assert "teacher" in up["distill_data@bold"] and "prepare" in up["teacher"]

        # 2. Rerun: DVC finds everything up to date, so no stage executes.
        state, second_run = run_flow(root, targets)
        assert [s["status"] for s in state.result()["stages"]] == ["skipped"] * len(stages)
        assert set(asyncio.run(task_states(second_run)).values()) == {"Cached"}

        # 3. One evaluator param changed: the evaluator and what depends on it rerun, prepare does not.
        set_param(root, "evaluator", "epochs", 2)
        state, _ = run_flow(root, targets)
        assert {s["stage"]: s["status"] for s in state.result()["stages"]} == {
            "prepare": "skipped", "evaluator": "executed", **dict.fromkeys(downstream, "executed")}

        # 4. A bad prepare param: the flow fails with the stage's message; nothing downstream starts.
        lock_before = (root / "dvc.lock").read_text()
        set_param(root, "prepare", "resolution", 4)
        state, failed_run = run_flow(root, targets)
        assert state.is_failed()
        with pytest.raises(Exception, match=r"(?s)stage prepare failed.*prepare\.resolution"):
            state.result()
        states = asyncio.run(task_states(failed_run))
        assert states["prepare"] == "Failed"
        assert all(states.get(s) != "Completed" for s in ["evaluator", *downstream])
        assert (root / "dvc.lock").read_text() == lock_before

        # Executed stages materialized their outputs (run 1: all five, run 3: all but prepare); skipped
        # ones did not.
        events = materializations(expected=2 * len(stages) - 1)
        by_asset = {}
        for event in events:
            by_asset.setdefault(event.resource.id, []).append(event)
        data = {p: asset_key(root, p) for p in ("data/prepare", "data/evaluator", "data/teacher",
                                                 *(f"data/distill_data/{c}" for c in params["distill_data"]["concepts"]),
                                                 "data/gan_base", "data/lora/italic", "data/step_distill")}
        assert {k: len(v) for k, v in by_asset.items()} == {
            key: 1 if path == "data/prepare" else 2 for path, key in data.items()}
        latest = max(by_asset[data["data/evaluator"]], key=lambda e: e.occurred)
        assert latest.payload["params"]["evaluator.epochs"] == 2
        assert latest.payload["md5"] == lock_md5(root, "evaluator", "data/evaluator")
        assert data["data/prepare"] in {r.id for r in latest.related if r.role == "asset"}
        teacher = max(by_asset[data["data/teacher"]], key=lambda e: e.occurred)
        assert {data["data/prepare"], data["data/evaluator"]} <= {r.id for r in teacher.related
                                                                  if r.role == "asset"}
        pairs = max(by_asset[data["data/distill_data/bold"]], key=lambda e: e.occurred)
        assert {data["data/teacher"], data["data/prepare"]} <= {r.id for r in pairs.related if r.role == "asset"}
        editor = max(by_asset[data["data/lora/italic"]], key=lambda e: e.occurred)
        assert {data["data/gan_base"], data["data/distill_data/italic"]} <= {r.id for r in editor.related
                                                                            if r.role == "asset"}


def test_stage_graph_tells_data_deps_by_what_produced_them():
    """Deps some stage made are lineage (asset deps); code folders and files are covered by the commit."""
    from flows.pipeline import stage_graph

    specs = {s.name: s for s in stage_graph(ROOT, ["lora@italic"])}
    assert set(specs["lora@italic"].data_deps) == {"data/distill_data/italic", "data/gan_base", "data/evaluator",
                                                   "data/teacher"}
    assert specs["prepare"].data_deps == ()
    assert set(specs["gan_base"].upstream) == {"evaluator", "distill_data@bold", "distill_data@thin",
                                               "distill_data@recolor_blue"}


def test_executions_ask_dvc_not_the_log(tmp_path):
    """Which stages execute, from DVC's own status: all on a cold run; none on a rerun (one `dvc status`
    for the whole flow); after a param change, the changed stage and only those downstream whose inputs
    really changed (an upstream rerun that rewrites identical bytes leaves its downstream up to date)."""
    from flows.pipeline import Executions, dvc_repro, stage_graph

    write = "import yaml; v = yaml.safe_load(open('params.yaml'))['up']['v']; open('up.txt', 'w').write(str(v))"
    dvc_file = {"stages": {
        "up": {"cmd": f'python -c "{write}"', "params": ["up"], "outs": ["up.txt"]},
        "down": {"cmd": "python -c \"open('down.txt', 'w').write(open('up.txt').read())\"", "deps": ["up.txt"],
                 "outs": ["down.txt"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_file))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"up": {"v": 1, "note": "a"}}))
    for cmd in (["git", "init", "-q"], [*dvc(), "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=stage_env())
    specs = stage_graph(tmp_path)
    up, down = specs

    def run_flow_by_hand(expected: dict[str, bool]):
        executions = Executions(tmp_path, specs, force=False)
        for spec in specs:
            assert executions.will_execute(spec) is expected[spec.name], spec.name
            dvc_repro(tmp_path, spec.name, False, lambda line: None)
            if expected[spec.name]:
                executions.record(spec)

    run_flow_by_hand({"up": True, "down": True})
    run_flow_by_hand({"up": False, "down": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"up": {"v": 2, "note": "a"}}))
    run_flow_by_hand({"up": True, "down": True})
    assert (tmp_path / "down.txt").read_text() == "2"
    # A change that up's output does not depend on: up reruns, its bytes are the same, down stays.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"up": {"v": 2, "note": "b"}}))
    run_flow_by_hand({"up": True, "down": False})
    assert Executions(tmp_path, specs, force=True).will_execute(down)


FLAKY = """
import os, pathlib, signal
# First attempt: killed by a signal, as the OOM killer would. Second: succeeds.
mark = pathlib.Path("attempts.txt")
mark.write_text(mark.read_text() + "x" if mark.exists() else "x")
if len(mark.read_text()) == 1:
    os.kill(os.getpid(), signal.SIGKILL)
pathlib.Path("flaky.txt").write_text("ok")
"""


SLOW = """
import os, pathlib, time
# Holds the pipeline lock until the test has seen the other runs meet it (at most 300 s).
started = time.time()
while not os.path.exists("release") and time.time() - started < 300:
    time.sleep(0.1)
pathlib.Path("slow.txt").write_text("done")
"""


def test_flow_retries_only_what_a_retry_helps_and_runs_one_at_a_time(tmp_path, monkeypatch):
    """A stage killed by a signal is retried and succeeds; one failing on its input (exit 2) is not retried and
    its error is in the run's log. Two runs of one checkout at once: the second refuses with a clear message, or
    with --wait queues behind the first and finds everything up to date; dvc.lock stays consistent."""
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "slow.py").write_text(SLOW)
    dvc_file = {"stages": {
        "flaky": {"cmd": "python flaky.py", "outs": ["flaky.txt"]},
        "bad": {"cmd": "python -c \"import sys; print('bad failed: params.yaml: bad.x: not a number'); "
                       "sys.exit(2)\"", "deps": ["flaky.txt"], "outs": ["bad.txt"]},
        "slow": {"cmd": "python slow.py", "outs": ["slow.txt"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_file))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": {"retries": {"default": 2},
                                                                   "retry_delay_s": 0.5}}))
    for cmd in (["git", "init", "-q"], [*dvc(), "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=stage_env())

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}), \
            prefect_test_harness(server_startup_timeout=180):
        state, run_id = run_flow(tmp_path, ["bad"])
        assert state.is_failed()
        assert (tmp_path / "attempts.txt").read_text() == "xx"
        # Task-run states and log lines reach the server in batches: read until they have all arrived.
        APILogHandler().flush()
        EventsWorker.drain_all()
        deadline = time.monotonic() + 60
        while True:
            runs = asyncio.run(task_runs(run_id))
            logs = asyncio.run(error_logs(run_id))
            seen = ({k: (r.state.name, r.run_count) for k, r in runs.items()},
                    any("stage bad failed" in line and "bad.x: not a number" in line for line in logs))
            if seen == ({"flaky": ("Completed", 2), "bad": ("Failed", 1)}, True) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert seen == ({"flaky": ("Completed", 2), "bad": ("Failed", 1)}, True), (seen, logs)

        env = {**stage_env(), "PREFECT_API_URL": PREFECT_API_URL.value()}
        cmd = [sys.executable, "-m", "condenser.cli", "run", "slow", "--root", str(tmp_path)]
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        lock = tmp_path / ".dvc" / "tmp" / "condenser-pipeline.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()[0][-2000:]
            time.sleep(0.2)
        refused = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        waited = subprocess.Popen([*cmd, "--wait"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(waited.stdout), daemon=True).start()
        while not any("waiting for the pipeline lock" in line for line in lines):
            assert time.monotonic() < deadline + 240 and waited.poll() is None, "".join(lines)[-2000:]
            time.sleep(0.2)
        (tmp_path / "release").touch()
        assert first.wait(timeout=180) == 0, first.communicate()[0][-2000:]
        assert waited.wait(timeout=180) == 0, "".join(lines)[-2000:]
        time.sleep(0.5)
        out = "".join(lines)
        assert refused.returncode == 1
        assert "another pipeline run holds" in refused.stderr and "--wait" in refused.stderr, refused.stderr[-2000:]
        assert "waiting for the pipeline lock" in out and "skipped" in out
        assert "Data and pipelines are up to date" in dvc_status(tmp_path, "slow")
        assert (tmp_path / "slow.txt").read_text() == "done"


async def task_runs(flow_run_id) -> dict:
    async with get_client() as client:
        runs = await client.read_task_runs(limit=50, sort=TaskRunSort.NAME_ASC, **flow_run_filter(flow_run_id))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


async def error_logs(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
    from prefect.client.schemas.sorting import LogSort

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                                                level=LogFilterLevel(ge_=40)),
                                      limit=50, offset=0, sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]
