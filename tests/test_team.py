"""The team workflow against real services: `condenser serve` (a Prefect server on 127.0.0.1, the process work
pool, prefect.yaml's deployment with its cron schedule and commit trigger, a worker), the git post-commit hook,
and runs of the flow that refuse, wait or retry where they should.

The project is a real tiny one whose dvc.yaml keeps prepare and evaluator: a triggered run executes real stages
in seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import tiny_params

from bench.pipeline import scratch_project, stage_env
from flows.hooks import commit_event, emit, git, install, pipeline_inputs
from flows.serve import free_port

STAGES = ["prepare", "evaluator"]



def tiny_project(path: Path) -> Path:
    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    root = scratch_project(path, params, stages=STAGES)
    (root / "README.md").write_text("# a tiny project\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "readme")
    return root


def commit(root: Path, message: str) -> tuple[str, float]:
    """Commit everything; the sha and how long `git commit` took (the hook must not hold it up)."""
    git(root, "add", "-A")
    started = time.perf_counter()
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD"), time.perf_counter() - started


class Serve:
    """`condenser serve` as a user starts it, in its own process group; its output collected."""

    def __init__(self, root: Path, port: int, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "condenser.cli", "serve", "--root", str(root),
                                      "--port", str(port)], cwd=root, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stdout),
                         daemon=True).start()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "ready; Ctrl-C stops" not in self.output:
            assert self.proc.poll() is None, f"condenser serve exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"condenser serve not ready after {timeout_s} s:\n{self.output}"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def flow_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            # This client sends an unset sort as null, which the server rejects.
            return await client.read_flow_runs(limit=50, sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def wait_for_run(api_url: str, sha: str, timeout_s: float) -> object:
    """The flow run created for `sha`, once it reached a final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in asyncio.run(flow_runs(api_url)):
            if run.parameters.get("sha") == sha and run.state and run.state.is_final():
                return run
        time.sleep(1)
    raise AssertionError(f"no finished flow run for {sha} after {timeout_s} s: "
                         f"{[(r.parameters, r.state_name) for r in asyncio.run(flow_runs(api_url))]}")


def artifacts_and_logs(api_url: str, flow_run_id) -> tuple[dict, list[str]]:
    """A flow run's artifacts by key (its own and its tasks') and its log lines, read as the UI reads them.
    Plain HTTP: Prefect's client sends unset filters as null, which its server rejects, and an empty task-run
    filter would drop the artifacts the flow itself made."""
    import httpx

    with httpx.Client(base_url=api_url, timeout=30) as http:
        artifacts = http.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 100, "offset": 0,
            "sort": "KEY_ASC"}).raise_for_status().json()
        logs = http.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": 0,
            "sort": "TIMESTAMP_ASC"}).raise_for_status().json()
    return {a["key"]: a["data"] for a in artifacts}, [f"{log['level']} {log['message']}" for log in logs]


def test_hook_sends_only_commits_that_change_pipeline_inputs(tmp_path):
    root = tiny_project(tmp_path / "project")
    assert pipeline_inputs(root, ["README.md", "docs/x.png", "dvc.lock", "metrics/prepare.json"]) == []
    assert pipeline_inputs(root, ["params.yaml", "condenser/core/io.py", "tasks/prepare.py", "flows/pipeline.py",
                                  "data/raw.dvc", "dvc.yaml"]) == [
        "params.yaml", "condenser/core/io.py", "tasks/prepare.py", "flows/pipeline.py", "data/raw.dvc", "dvc.yaml"]
    assert commit_event(root) is None  # the last commit added only README.md
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    sha, _ = commit(root, "two epochs")
    event = commit_event(root)
    assert event["event"] == "git.commit" and event["payload"]["sha"] == sha
    assert event["payload"]["changed"] == ["params.yaml"] and event["payload"]["branch"] == git(
        root, "rev-parse", "--abbrev-ref", "HEAD")
    assert event["resource"]["prefect.resource.id"] == f"condenser.repo.{root.resolve()}"
    # No server at all: the commit still succeeds at once and the hook logs why nothing was sent.
    install(root, f"http://127.0.0.1:{free_port()}/api")
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("epochs: 2", "epochs: 3"))
    _, took = commit(root, "three epochs")
    assert took < 5
    log = root / ".git" / "condenser-hook.log"
    deadline = time.monotonic() + 30
    while "no Prefect server answered" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.is_file() else "no hook log"
        time.sleep(0.5)
    with pytest.raises(OSError):
        emit(f"http://127.0.0.1:{free_port()}/api", event, timeout_s=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_schedules_and_a_commit_triggers_a_run_of_that_commit(tmp_path):
    root = tiny_project(tmp_path / "project")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**stage_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    serve = Serve(root, port, env)
    try:
        serve.wait_ready(timeout_s=300)
        # 1. Bound to this machine only.
        listening = {c.laddr.ip for p in psutil.Process(serve.proc.pid).children(recursive=True)
                     for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening
        # 2. The nightly schedule, with the next run the scheduler will create: 02:00 UTC after now.
        now = datetime.now(timezone.utc)
        expected = now.replace(hour=2, minute=0, second=0, microsecond=0)
        expected += timedelta(days=1) if expected <= now else timedelta()
        assert f"cron '0 2 * * *' UTC, next run {expected.isoformat()}" in serve.output, serve.output

        # 3. The hook: a README-only commit sends nothing; a params commit sends git.commit, and the trigger
        # creates a run of that commit, which the worker runs to completion.
        install(root, api_url)
        (root / "README.md").write_text("# a tiny project\n\nnotes\n")
        readme_sha, _ = commit(root, "notes only")
        (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("epochs: 1", "epochs: 2"))
        sha, took = commit(root, "two epochs")
        assert took < 5
        committed = time.monotonic()
        run = wait_for_run(api_url, sha, timeout_s=240)
        assert run.state.is_completed(), (run.state.message, serve.output[-3000:])
        assert run.parameters["branch"] == git(root, "rev-parse", "--abbrev-ref", "HEAD")
        assert run.deployment_id is not None
        print(f"commit to finished run: {time.monotonic() - committed:.1f} s")
        runs = asyncio.run(flow_runs(api_url))
        log = (root / ".git" / "condenser-hook.log").read_text()
        assert [r.parameters["sha"] for r in runs if r.parameters.get("sha")] == [sha], (
            log, [(r.name, r.parameters, r.state_name, r.created, r.created_by, r.auto_scheduled) for r in runs])
        # The rest are the scheduler's: nightly runs, the first at the next 02:00 UTC.
        scheduled = [r for r in runs if not r.parameters.get("sha")]
        assert scheduled and all(r.state.is_scheduled() for r in scheduled)
        assert min(r.expected_start_time for r in scheduled) == expected
        log = (root / ".git" / "condenser-hook.log").read_text()
        assert f"{readme_sha[:12]}: no pipeline input changed" in log and f"{sha[:12]}: git.commit sent" in log
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        assert lock["evaluator"]["params"]["params.yaml"]["evaluator"]["epochs"] == 2

        # The run's lineage names the commit and branch; the stages' own lines are in its log.
        artifacts, logs = (artifacts_and_logs(api_url, run.id))
        assert sha in artifacts["pipeline-lineage"] and "data/evaluator" in artifacts["pipeline-lineage"]
        assert artifacts["pipeline-lineage-graph"].startswith("data:image/png;base64,")
        assert "| evaluator | executed |" in artifacts["pipeline-report"]
        assert any("Running stage 'evaluator'" in line for line in logs)
        # What a user sees of it in the Prefect UI, in a real browser (flows/ui.py): the run's artifacts, the
        # lineage's md5s as dvc.lock holds them, the graph drawn, each stage's lines under its task run.
        browser = ui_check(api_url.removesuffix("/api"), run.id, root, tmp_path / "shots")

        # 4. An event for a commit the checkout is not at: the run refuses, and says why.
        event = commit_event(root)
        event["payload"]["sha"] = readme_sha
        emit(api_url, event)
        refused = wait_for_run(api_url, readme_sha, timeout_s=120)
        assert refused.state.is_failed()
        _, logs = (artifacts_and_logs(api_url, refused.id))
        assert any("refusing to run" in line and readme_sha[:12] in line for line in logs), logs[-5:]

        # 5. Ctrl-C stops the worker and the server it started.
        os.killpg(serve.proc.pid, signal.SIGINT)
        assert serve.proc.wait(timeout=90) == 0, serve.output[-2000:]
        assert "stopped" in serve.output
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        serve.kill()
    if browser is not None:
        pytest.skip(f"everything but the browser check passed: {browser}")


UI_LOGS = ("Running stage 'prepare'", "> python -m tasks.prepare", "> python -m tasks.evaluator", "evaluator done:")


def ui_check(ui_url: str, flow_run_id, root: Path, shots: Path) -> str | None:
    """The flow run seen in headless Chromium; None when checked, else why it could not be (no Chromium)."""
    import struct

    from condenser.lineage import read_lock
    from condenser.report.browser import WIDTH, BrowserMissing, require_chromium
    from flows.ui import RUN_ARTIFACTS, UiError, inspect_flow_run

    try:
        require_chromium()
    except BrowserMissing as err:
        return str(err)
    with pytest.raises(UiError, match="no flow run"):
        inspect_flow_run(ui_url, "00000000-0000-4000-8000-000000000000", shots / "unknown", timeout_s=30)
    found = inspect_flow_run(ui_url, str(flow_run_id), shots, logs=UI_LOGS)
    assert found["state"] == "Completed" and found["name"]
    assert {k: found["artifacts"][k]["type"] for k in RUN_ARTIFACTS} == {
        "pipeline-lineage": "markdown", "pipeline-report": "markdown", "pipeline-lineage-graph": "image"}
    for stage in ("prepare", "evaluator"):
        for kind in ("lineage", "metrics"):
            assert found["artifacts"][f"{stage}-{kind}"]["type"] == "table", (stage, kind, found["artifacts"])
    # The lineage page: every output in dvc.lock with its md5, row by row; the report: a row per stage, executed.
    records = read_lock(root)
    lineage = [row for table in found["pages"]["pipeline-lineage"]["tables"] for row in table]
    for stage, record in records.items():
        for out, md5 in record.outs.items():
            assert any(row[:3] == [stage, out, md5] for row in lineage), (stage, out, md5, lineage)
    assert "flowchart LR" in found["pages"]["pipeline-lineage"]["text"]
    report = {row[0]: row for table in found["pages"]["pipeline-report"]["tables"] for row in table}
    for stage, record in records.items():
        assert report[stage][1] == "executed"
        assert record.outs[f"data/{stage}"][:12] in report[stage][2]
    # The graph, a data: URL PNG, decoded by the browser to a picture.
    [image] = found["pages"]["pipeline-lineage-graph"]["images"]
    assert image["scheme"] == "data" and image["rendered"] and image["width"] > 100
    for text in UI_LOGS:
        stage = "evaluator" if "evaluator" in text else "prepare"
        assert found["logs"][text]["task_run"].startswith(f"{stage}-"), found["logs"][text]
        assert found["logs"][text]["level"] == "INFO"
    for view, path in found["screenshots"].items():
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] == WIDTH, view
    return None
